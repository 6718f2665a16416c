"""Compress a corpus into memories with Ray Data: one memory per document, Parquet on S3 or a local path.

On a cluster (one GPU per writer actor):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/compress.py --reader s3://my-bucket/readers/kv_n16 --input s3://my-bucket/corpus/ \
        --output s3://my-bucket/memories/kv_n16 --actors 8 --gpus-per-actor 1 --batch-size 256

On this machine (no RAY_ADDRESS: a local Ray is started and stopped by the job):

    python jobs/compress.py --reader runs/demo/reader --input corpus/ --output runs/demo/memories --actors 2

Long documents: --chunk splits a document over the reader's max_context_tokens into ordered chunks, one memory
each (--chunk-tokens T per chunk, default that maximum; --chunk-overlap O tokens repeated from the chunk before,
default 0). The chunking is recorded in the store; a later run on the same --output must use the same one:

    python jobs/compress.py --reader runs/demo/reader --input corpus/ --output runs/demo/memories \
        --chunk --chunk-tokens 64 --chunk-overlap 8

--input: a .jsonl file (one {"id", "text"} object per line), a .json file (JSON lines or one JSON array), a
Parquet file with string id and text columns, or a directory of such files and/or .txt files (id = the file name
without .txt), local or s3://. Output:
OUTPUT/memories/*.parquet, OUTPUT/errors/*.parquet (inputs that did not become memories, with the reason) and
OUTPUT/manifest.json. Rerunning the same command writes only what is missing; the exit status is 1 when the
run's inputs are not all accounted for (see the manifest's "complete"), 2 when the job refuses to start (another
reader's or setting's store, a missing input, a malformed manifest.json): one line says why.
"""

from __future__ import annotations

import argparse
import json
import sys

import _common  # noqa: F401
from _common import connect_ray, refusals, setup_logging

from gradmem.config import add_flags, from_flags
from pipelines.compress import CompressConfig, compress


def parse(argv: list[str] | None = None) -> CompressConfig:
    """Every field of CompressConfig is a flag (``batch_size`` -> ``--batch-size``); defaults live there."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, CompressConfig)
    args = parser.parse_args(argv)
    try:
        return from_flags(CompressConfig, args)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> None:
    cfg = parse(argv)
    setup_logging()

    connect_ray()
    with refusals("compress"):
        manifest = compress(cfg)
    print(json.dumps({k: manifest[k] for k in ("inputs", "memories", "errors", "error_reasons", "complete")}))
    if not manifest["complete"]:
        print(f"the store at {cfg.output} does not account for every input exactly once: see its manifest.json",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
