"""Compress a corpus into memories with Ray Data: one memory per document, Parquet on S3 or a local path.

On a cluster (one GPU per writer actor):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/compress.py --reader s3://my-bucket/readers/kv_n16 --input s3://my-bucket/corpus/ \
        --output s3://my-bucket/memories/kv_n16 --actors 8 --gpus-per-actor 1 --batch-size 256

On this machine (no RAY_ADDRESS: a local Ray is started and stopped by the job):

    python jobs/compress.py --reader runs/demo/reader --input corpus/ --output runs/demo/memories --actors 2

--input: a .jsonl file (one {"id", "text"} object per line), a .json file (JSON lines or one JSON array), a
Parquet file with string id and text columns, or a directory of such files and/or .txt files (id = the file name
without .txt), local or s3://. Output:
OUTPUT/memories/*.parquet, OUTPUT/errors/*.parquet (inputs that did not become memories, with the reason) and
OUTPUT/manifest.json. Rerunning the same command writes only what is missing; the exit status is 1 when the
run's inputs are not all accounted for (see the manifest's "complete").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import _common  # noqa: F401
from _common import ROOT, setup_logging

from pipelines.compress import CompressConfig, compress


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", required=True, help="reader directory (local or s3://)")
    parser.add_argument("--input", required=True, help="file or directory of .jsonl/.json/.parquet/.txt (local or s3://)")
    parser.add_argument("--output", required=True, help="memory store root (local or s3://)")
    parser.add_argument("--steps", type=int, default=None, help="WRITE steps K (default: the reader's)")
    parser.add_argument("--lr", type=float, default=None, help="WRITE step size (default: the reader's)")
    parser.add_argument("--batch-size", type=int, default=32, help="contexts per WRITE batch")
    parser.add_argument("--actors", type=int, default=1, help="writer actors")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--chunk", action="store_true", help="split over-long documents into ordered chunks")
    parser.add_argument("--no-greedy-check", action="store_true",
                        help="skip the free-running reconstruction check (one decoding step per token)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each writer's backbone")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    setup_logging()
    cfg = CompressConfig(reader=args.reader, input=args.input, output=args.output, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                         gpus_per_actor=args.gpus_per_actor, chunk=args.chunk, greedy_check=not args.no_greedy_check,
                         compile=args.compile, s3_endpoint=args.s3_endpoint)
    cfg.validate()

    import ray

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}} if "RAY_ADDRESS" not in os.environ else None)
    manifest = compress(cfg)
    print(json.dumps({k: manifest[k] for k in ("inputs", "memories", "errors", "error_reasons", "complete")}))
    if not manifest["complete"]:
        print(f"the store at {args.output} does not account for every input exactly once: see its manifest.json",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
