"""Cost accounting of a memory store: write seconds, bytes stored, the KV cache the same contexts would take,
prefill tokens saved per query and the break-even number of queries, per store and per memory.

    python jobs/inspect_store.py runs/demo/memories
    python jobs/inspect_store.py s3://my-bucket/memories/kv_n16 --reader s3://my-bucket/readers/kv_n16 \
        --s3-endpoint http://127.0.0.1:8333 --json costs.json --per-memory 20

Prints a markdown table for the store (one column per reader and write setting when it holds several) and the
first --per-memory memories; --json writes the same figures, every memory included. The reader defaults to the
one the store's manifest names (when reachable from here); without one, KV bytes, tokens saved and break-even
are left out. The prefill cost per token is timed with the reader on this machine (--device, --repeats,
--measure-tokens) unless --prefill-s-per-token gives it; the output says which. Every figure is defined in
gradmem/costs.py. (Named inspect_store.py, not inspect.py: a script of that name would shadow Python's own
``inspect`` module, which dataclasses and torch import.)

Exit status: 0 with a report (an empty store reports zeros), 2 when STORE is not a memory store or the reader
given with --reader cannot be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys

import _common  # noqa: F401
from _common import setup_logging

from gradmem import costs
from gradmem.config import add_flags, from_flags

logger = logging.getLogger("inspect_store")


class Refused(Exception):
    """A STORE or --reader that cannot be read: the job exits with status 2 and this message."""


def parse(argv: list[str] | None = None) -> costs.CostConfig:
    """STORE is positional, --json names the JSON output; every other field of CostConfig is a flag."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", metavar="STORE", help="the memory store: a local directory or s3://bucket/prefix")
    parser.add_argument("--json", dest="json_out", metavar="OUT", default=None, help="write the figures as JSON here")
    add_flags(parser, costs.CostConfig, skip=("store", "json_out"))
    args = parser.parse_args(argv)
    try:
        return from_flags(costs.CostConfig, args, store=args.store, json_out=args.json_out)
    except ValueError as exc:
        parser.error(str(exc))


def open_store(cfg: costs.CostConfig):
    import pyarrow.fs as pafs

    from gradmem.store import MemoryStore
    from pipelines.storage import resolve

    try:
        location = resolve(cfg.store, cfg.s3_endpoint)
        info = location.filesystem.get_file_info(location.path)
    except (ValueError, OSError) as exc:
        raise Refused(f"{cfg.store}: cannot be opened ({exc})") from None
    if info.type != pafs.FileType.Directory:
        raise Refused(f"{cfg.store}: no such directory")
    store = MemoryStore(location.filesystem, location.path)
    found = [name for name in ("memories", "errors", "manifest.json")
             if location.filesystem.get_file_info(f"{store.root}/{name}").type != pafs.FileType.NotFound]
    if not found:
        raise Refused(f"{cfg.store}: not a memory store (no memories/, errors/ or manifest.json there)")
    return store


def reader_dir(cfg: costs.CostConfig, manifest: dict | None, weights: bool) -> tuple[str | None, str]:
    """(a local reader directory or None, where it came from or why there is none). An unreadable --reader is
    refused; an unreachable manifest reader is only noted."""
    from pipelines.storage import local_dir

    uri, origin = (cfg.reader, "--reader") if cfg.reader else ((manifest or {}).get("reader"), "the manifest")
    if not uri:
        return None, "no --reader given and the store has no manifest naming one"
    if not isinstance(uri, str):
        return None, f"the manifest's reader is not a location ({type(uri).__name__})"
    try:
        path = local_dir(uri, cfg.s3_endpoint, skip_suffixes=() if weights else (".safetensors",))
        from gradmem.checkpoint import read_section

        read_section(path)
        return path, f"{uri} (from {origin})"
    except (OSError, ValueError) as exc:
        if cfg.reader:
            raise Refused(f"--reader {uri}: cannot be read ({exc})") from None
        logger.warning("the reader the manifest names (%s) is not reachable from here: %s", uri, exc)
        return None, f"the reader the manifest names ({uri}) is not reachable from here"


def prefill_cost(cfg: costs.CostConfig, path: str | None, lengths: list[int]) -> costs.PrefillCost:
    if cfg.prefill_s_per_token is not None:
        return costs.given_prefill(cfg.prefill_s_per_token)
    if not cfg.measure:
        return costs.no_prefill("--no-measure and no --prefill-s-per-token")
    if path is None:
        return costs.no_prefill("no reader to time (give --reader or --prefill-s-per-token)")
    if not lengths:
        return costs.no_prefill("the store holds no memories of this reader to take a context length from")
    from gradmem import Reader

    reader = Reader.from_pretrained(path)
    n_tokens = min(cfg.measure_tokens or int(statistics.median(lengths)), reader.max_positions)
    return costs.measure_prefill(reader.lm, n_tokens, cfg.repeats, cfg.device, len(reader.tokenizer))


def report(cfg: costs.CostConfig) -> dict:
    store = open_store(cfg)
    parts = costs.read_parts(store)
    measuring = cfg.prefill_s_per_token is None and cfg.measure
    path, origin = reader_dir(cfg, store.manifest(), weights=measuring)
    reader: dict = {"dir": origin if path else None, "why": None if path else origin}
    geometry = None
    if path is not None:
        from gradmem.checkpoint import read_section

        section = read_section(path)
        with open(f"{path}/config.json") as f:
            geometry = costs.kv_geometry(json.load(f), cfg.kv_dtype)
        reader.update(fingerprint=section["fingerprint"], method=section["memory"].get("method", "gradmem"),
                      num_memory=section["memory"]["num_memory"])
    lengths = [r["n_context_tokens"] for p in parts if p.fingerprint == reader.get("fingerprint") for r in p.rows]
    prefill = prefill_cost(cfg, path, lengths)
    return costs.build_report(cfg.store, parts, len(store.skipped["memories"]), reader, geometry, prefill)


def main(argv: list[str] | None = None) -> None:
    cfg = parse(argv)
    setup_logging()
    try:
        result = report(cfg)
    except (Refused, ValueError) as exc:  # ValueError: the store's manifest.json is not a JSON object
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(costs.render(result, cfg.per_memory))
    if cfg.json_out:
        costs.write_json(result, cfg.json_out)
        print(f"\nJSON: {cfg.json_out}")


if __name__ == "__main__":
    main()
