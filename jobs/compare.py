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

import argparse
import sys

import _common  # noqa: F401
from _common import ROOT, setup_logging

import torch

from gradmem.compare import CompareConfig, run_compare
from gradmem.runtime import configure_cpu


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="jobs/configs/{babi,squad}_*.yaml")
    parser.add_argument("--output", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--only", default=None, help="comma-separated method names to run (default: all)")
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
    only = [name for name in args.only.split(",") if name] if args.only else None
    try:
        cfg = CompareConfig.from_yaml(args.config)
        cfg.select(only)
        if args.max_steps is not None and args.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    except (OSError, ValueError) as exc:
        print(f"compare: bad config {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output = args.output or str(ROOT / "runs" / args.config.rsplit("/", 1)[-1].removesuffix(".yaml"))
    command = ["python", "jobs/compare.py", *(sys.argv[1:] if argv is None else argv)]
    summary = run_compare(cfg, output, only=only, max_steps=args.max_steps, command=command, repo_root=ROOT,
                          device=device)
    print((_common.Path(output) / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
