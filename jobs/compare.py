"""Train GradMem and the baselines on bAbI or SQuAD with the same budget; learning curves and test scores.

    # bAbI qa1, reader from scratch on this machine (2 cores: two one-thread processes on one output)
    python jobs/compare.py --config jobs/configs/babi_qa1_cpu.yaml --threads 1 --only gradmem,rmt &
    python jobs/compare.py --config jobs/configs/babi_qa1_cpu.yaml --threads 1 --only full_context,no_context
    python jobs/compare.py --config jobs/configs/babi_qa1_cpu.yaml   # rebuilds the report (all cells done)

    # SQuAD "C -> Q+A", reader from scratch on this machine
    python jobs/compare.py --config jobs/configs/squad_cqa_cpu.yaml --threads 1

    # the paper's settings on a GPU (a pretrained model directory from jobs/prepare_model.py)
    python jobs/prepare_model.py --output runs/smollm2
    python jobs/compare.py --config jobs/configs/babi_qa1_gpu.yaml

    # any configuration end to end in seconds: every method 5 steps
    python jobs/compare.py --config jobs/configs/babi_qa1_cpu.yaml --output /tmp/cmp_check --max-steps 5

Interrupted? Run the same command again: finished methods (OUTPUT/cells/*.json) are skipped and a method cut
off while training continues from its last checkpoint. Writes OUTPUT/results.json, results.md and compare.png
after every method and prints the table at the end. See gradmem/compare.py for the format and the layout.
"""

from __future__ import annotations

import sys

import _common
from _common import ROOT

from gradmem.compare import CompareConfig, run_compare


def main(argv: list[str] | None = None) -> dict:
    parser = _common.benchmark_parser(__doc__, "jobs/configs/{babi,squad}_*.yaml")
    parser.add_argument("--only", default=None, help="comma-separated method names to run (default: all)")
    args = parser.parse_args(argv)
    only = [name for name in args.only.split(",") if name] if args.only else None
    try:
        device = _common.start_benchmark(args)
        cfg = CompareConfig.from_yaml(args.config)
        cfg.select(only)
    except (OSError, ValueError) as exc:
        print(f"compare: bad config {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    output = args.output or str(ROOT / "runs" / args.config.rsplit("/", 1)[-1].removesuffix(".yaml"))
    command = ["python", "jobs/compare.py", *(sys.argv[1:] if argv is None else argv)]
    summary = run_compare(cfg, output, only=only, max_steps=args.max_steps, command=command, repo_root=ROOT,
                          device=device)
    print((_common.Path(output) / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
