"""Maintain a memory store written by jobs/compress.py: repair weak memories, upgrade to a new reader.

Repair: rewrite the memories whose recorded reconstruction accuracy is under --below with another write setting
(more --steps, or an adaptive --target-accuracy), from the same input the compression read:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/maintain.py repair --reader s3://my-bucket/readers/kv_n16 --input s3://my-bucket/corpus/ \
        --output s3://my-bucket/memories/kv_n16 --below 0.9 --steps 16 --actors 8 --gpus-per-actor 1

Upgrade: write the store's documents with a newly trained reader (only what it lacks), then make it the served
reader; a running service keeps answering from the old reader until then and switches by itself:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/maintain.py upgrade --reader s3://my-bucket/readers/kv_n16_v2 --input s3://my-bucket/corpus/ \
        --output s3://my-bucket/memories/kv_n16 --actors 8 --gpus-per-actor 1

On this machine (no RAY_ADDRESS: a local Ray is started and stopped by the job):

    python jobs/maintain.py repair --reader runs/demo/reader --input corpus/ --output runs/demo/memories --below 0.9 --steps 8
    python jobs/maintain.py upgrade --reader runs/demo/reader_v2 --input corpus/ --output runs/demo/memories

Both take every flag of jobs/compress.py (--output is the store), and both can be killed and rerun: the rerun
writes what is missing, and a rerun of a finished job writes nothing. The last line of stdout is a JSON summary;
the exit status is 1 when the job is not complete (repair: a planned memory was not rewritten; upgrade: the new
reader does not account for every input, so the served reader was not switched), 2 when the store, reader or
setting is refused (checked before anything is written; the message says why). See pipelines/maintain.py.
"""

from __future__ import annotations

import argparse
import json
import sys

import _common  # noqa: F401
from _common import connect_ray, refusals, setup_logging

from gradmem.config import add_flags, from_flags
from pipelines.compress import CompressConfig
from pipelines.maintain import RepairConfig, repair, upgrade


def parse(argv: list[str] | None = None) -> tuple[str, CompressConfig, RepairConfig | None]:
    """``repair``: CompressConfig's and RepairConfig's fields as flags; ``upgrade``: CompressConfig's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fix = commands.add_parser("repair", help="rewrite weak memories with more steps")
    add_flags(fix, RepairConfig)
    add_flags(fix, CompressConfig)
    up = commands.add_parser("upgrade", help="write the store for a new reader, then serve it")
    add_flags(up, CompressConfig)
    args = parser.parse_args(argv)
    try:
        return (args.command, from_flags(CompressConfig, args),
                from_flags(RepairConfig, args) if args.command == "repair" else None)
    except ValueError as exc:
        parser.error(str(exc))


def run_repair(cfg: CompressConfig, rcfg: RepairConfig) -> dict:
    report = repair(cfg, rcfg)
    return {k: report[k] for k in ("planned", "already_repaired", "rewritten", "stale", "remaining", "still_weak",
                                   "complete")}


def run_upgrade(cfg: CompressConfig) -> dict:
    manifest = upgrade(cfg)
    summary = {k: manifest[k] for k in ("reader_fingerprint", "inputs", "memories", "errors", "complete")}
    return {**summary, "served": (manifest.get("served") or {}).get("fingerprint")}


def main(argv: list[str] | None = None) -> None:
    command, cfg, rcfg = parse(argv)
    setup_logging()

    connect_ray()
    with refusals(command):  # a store, reader or setting the job refuses (checked before it writes anything)
        summary = run_repair(cfg, rcfg) if command == "repair" else run_upgrade(cfg)
    print(json.dumps(summary))
    if not summary["complete"]:
        print(f"{command} of {cfg.output} is not complete: rerun the same command (see its manifest.json)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
