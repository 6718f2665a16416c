"""Capacity benchmark: train every method on key-value retrieval for each N, evaluate with each K_eval, tabulate.

    # seconds: the test's configuration (tiny model, N = 1 and 2)
    python jobs/capacity.py --config jobs/configs/capacity_smoke.yaml --output runs/capacity_smoke --threads 1

    # the CPU configuration (estimated wall time in the YAML's header; 2 cores)
    python jobs/capacity.py --config jobs/configs/capacity_cpu.yaml --output runs/capacity_cpu --threads 1

    # the paper's cells (8 vectors of 128, N = 16 and 32) on a GPU
    python jobs/capacity.py --config jobs/configs/capacity_paper_gpu.yaml --output runs/capacity_paper_gpu

    # a quick end-to-end check of any configuration: every cell with 20 training steps
    python jobs/capacity.py --config jobs/configs/capacity_cpu.yaml --output /tmp/cap_check --max-steps 20

A partial table while cells still train elsewhere: the same command with --report-only (trains nothing).

Interrupted? Run the same command again: finished cells (OUTPUT/cells/*.json) are skipped, and a cell cut off
while training continues from its last Trainer checkpoint (run.save_every). Writes OUTPUT/results.json,
OUTPUT/results.md and OUTPUT/capacity.png after every cell, and prints the table at the end.
See gradmem/capacity.py for the config format and the output layout.
"""

from __future__ import annotations

import sys

import _common
from _common import ROOT

from gradmem.capacity import CapacityConfig, run_capacity


def main(argv: list[str] | None = None) -> dict:
    parser = _common.benchmark_parser(__doc__, "jobs/configs/capacity_*.yaml")
    parser.add_argument("--only", default=None, help="comma-separated method names to run (default: all); "
                        "processes with disjoint lists can share one --output")
    parser.add_argument("--report-only", action="store_true",
                        help="write results.json/md/png from the cells finished so far, train nothing")
    args = parser.parse_args(argv)
    only = [name for name in args.only.split(",") if name] if args.only else None
    try:
        device = _common.start_benchmark(args)
        cfg = CapacityConfig.from_yaml(args.config)
        cfg.cells(only)  # unknown names fail here
    except (OSError, ValueError) as exc:
        print(f"capacity: bad config {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    output = args.output or str(ROOT / "runs" / ("capacity_" + args.config.rsplit("/", 1)[-1].removesuffix(".yaml")
                                                 .removeprefix("capacity_")))
    command = ["python", "jobs/capacity.py", *(sys.argv[1:] if argv is None else argv)]
    summary = run_capacity(cfg, output, max_steps=args.max_steps, command=command, repo_root=ROOT,
                           device=device, only=only, report_only=args.report_only)
    print((_common.Path(output) / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
