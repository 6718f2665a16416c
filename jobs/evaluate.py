"""Evaluate a reader on key-value retrieval for several numbers of WRITE steps at test time.

    python jobs/evaluate.py --reader runs/kv_tiny/reader --task kv --pairs 2 --steps 1,2,4,8
    python jobs/evaluate.py --reader runs/kv_n16/reader --task kv --pairs 16 --steps 1,2,5 --samples 5000 --json eval.json

Prints a table (exact match and token accuracy per K) and optionally writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging

import _common  # noqa: F401
from _common import setup_logging

from gradmem import Reader
from gradmem.tasks.kv import KVTask
from gradmem.train import evaluate

logger = logging.getLogger("evaluate")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", required=True)
    parser.add_argument("--task", default="kv", choices=["kv"])
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--steps", default="1,2,4,8", help="comma-separated WRITE step counts")
    parser.add_argument("--lr", type=float, default=None, help="write lr (default: the reader's)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    setup_logging()
    reader = Reader.from_pretrained(args.reader)
    steps = [int(s) for s in args.steps.split(",")]
    lr = args.lr if args.lr is not None else reader.config.write_lr
    results = evaluate(reader, KVTask(args.pairs), args.samples, steps, lr, seed=("evaluate", args.seed),
                       batch_size=args.batch_size)
    print(f"reader {reader.fingerprint}  pairs {args.pairs}  samples {args.samples}  write lr {lr}")
    print(f"{'K':>4} {'exact match':>12} {'token acc':>10} {'write loss':>11} {'recon acc':>10}")
    for k, r in results.items():
        print(f"{k:>4} {r['em']:>12.4f} {r['token_acc']:>10.4f} {r['write_loss']:>11.4f} {r['write_acc']:>10.4f}")
    out = {"reader": args.reader, "fingerprint": reader.fingerprint, "pairs": args.pairs, "samples": args.samples,
           "lr": lr, "results": {str(k): v for k, v in results.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
