"""Capacity benchmark: train every method on key-value retrieval for each N, evaluate with each K_eval, tabulate.

    # seconds: the test's configuration (tiny model, N = 1 and 2)
    python jobs/capacity.py --config jobs/configs/capacity_smoke.yaml --output runs/capacity_smoke --threads 1

    # the CPU configuration (estimated wall time in the YAML's header; 2 cores)
    python jobs/capacity.py --config jobs/configs/capacity_cpu.yaml --output runs/capacity_cpu --threads 1

    # the paper's cells (8 vectors of 128, N = 16 and 32) on a GPU
    python jobs/capacity.py --config jobs/configs/capacity_paper_gpu.yaml --output runs/capacity_paper_gpu

    # a quick end-to-end check of any configuration: every cell with 20 training steps
    python jobs/capacity.py --config jobs/configs/capacity_cpu.yaml --output /tmp/cap_check --max-steps 20

Interrupted? Run the same command again: finished cells (OUTPUT/cells/*.json) are skipped, and a cell cut off
while training continues from its last Trainer checkpoint (run.save_every). Writes OUTPUT/results.json,
OUTPUT/results.md and OUTPUT/capacity.png after every cell, and prints the table at the end.
See gradmem/capacity.py for the config format and the output layout.
"""

from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401
from _common import ROOT, setup_logging

import torch

from gradmem.capacity import CapacityConfig, run_capacity
from gradmem.runtime import configure_cpu


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="jobs/configs/capacity_*.yaml")
    parser.add_argument("--output", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override every method's training steps (smoke runs; a different config for resume)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    setup_logging()
    if args.threads is not None:
        configure_cpu(threads=args.threads)
    try:
        cfg = CapacityConfig.from_yaml(args.config)
        if args.max_steps is not None and args.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    except (OSError, ValueError) as exc:
        print(f"capacity: bad config {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output = args.output or str(ROOT / "runs" / ("capacity_" + args.config.rsplit("/", 1)[-1].removesuffix(".yaml")
                                                 .removeprefix("capacity_")))
    command = ["python", "jobs/capacity.py", *(sys.argv[1:] if argv is None else argv)]
    summary = run_capacity(cfg, output, max_steps=args.max_steps, command=command, repo_root=ROOT,
                           device=device)
    print((_common.Path(output) / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
