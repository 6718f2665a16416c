"""Evaluate a trained reader on its task's held-out data for several numbers of WRITE steps at test time.

    # key-value retrieval: generated samples (exact match and token accuracy per K)
    python jobs/evaluate.py --reader runs/kv_tiny/reader --task kv --pairs 2 --steps 1,2,4,8
    python jobs/evaluate.py --reader runs/kv_n16/reader --task kv --pairs 16 --steps 1,2,5 --samples 5000 --json eval.json

    # long documents: each question over a document of 4 chunks, every chunk its own memory, composed at READ
    python jobs/evaluate.py --reader runs/kv_tiny/reader --task kv --pairs 2 --chunks 4 --steps 2

    # bAbI: teacher-forced EM per K on the released test file, and greedy answers from memory scored by EM
    python jobs/evaluate.py --reader runs/babi_qa1_cpu/runs/gradmem/reader --task babi --babi-tasks qa1 --steps 1,2,4 --generate

    # SQuAD (dev set split by article): teacher-forced EM per K, and generated answers scored with EM and F1
    python jobs/evaluate.py --reader runs/squad_cqa_cpu/runs/gradmem/reader --task squad --variant c_qa --generate

Prints a table and optionally writes it as JSON. The split, set and variant must be the ones the reader was
trained for; a from-scratch reader's word vocabulary is its own (it travels in the reader directory).
"""

from __future__ import annotations

import argparse
import json
import logging

import _common  # noqa: F401
from _common import refusals, setup_logging

from gradmem import Reader
from gradmem.tasks.dataset import evaluate_generated
from gradmem.train import TaskConfig, build_task, evaluate

logger = logging.getLogger("evaluate")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", required=True)
    parser.add_argument("--task", default="kv", choices=["kv", "babi", "squad"])
    parser.add_argument("--pairs", type=int, default=None, help="kv: pairs per context (required for kv)")
    parser.add_argument("--babi-tasks", default="qa1", help="babi: comma-separated tasks (qa1,qa2,...)")
    parser.add_argument("--babi-set", default="en-10k", choices=["en", "en-10k"])
    parser.add_argument("--variant", default="c_qa", choices=["c_qa", "cq_a", "qc_a"], help="squad variant")
    parser.add_argument("--split", default="test", choices=["validation", "test"], help="babi, squad: which split")
    parser.add_argument("--data", default=None, help="babi: the tasks_1-20_v1-2 directory; squad: dev-v1.1.json (default: under $GRADMEM_DATA)")
    parser.add_argument("--chunks", default="1", help="c, or lo,hi: documents of c chunks (kv: c contexts of --pairs "
                        "pairs; babi, squad c_qa: the context split into c runs of sentences), each written into its "
                        "own memory and read composed; lo,hi cycles c over the range (task.chunks)")
    parser.add_argument("--steps", default="1,2,4,8", help="comma-separated WRITE step counts")
    parser.add_argument("--lr", type=float, default=None, help="write lr (default: the reader's)")
    parser.add_argument("--samples", type=int, default=1000, help="kv: samples; babi, squad: at most this many")
    parser.add_argument("--generate", action="store_true", help="babi, squad: also score greedy answers (trained K)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    if args.task == "kv" and args.pairs is None:
        parser.error("--task kv needs --pairs")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    setup_logging()
    with refusals("evaluate"):  # a reader, data file or setting it refuses: one line, exit 2
        return run(args)


def run(args: argparse.Namespace) -> dict:
    reader = Reader.from_pretrained(args.reader)
    steps = [int(s) for s in args.steps.split(",")]
    lr = args.lr if args.lr is not None else reader.config.write_lr
    chunks = [int(c) for c in args.chunks.split(",")]
    chunks = chunks * 2 if len(chunks) == 1 else chunks  # c is [c, c]
    task_cfg = TaskConfig(name=args.task, pairs=args.pairs or 1, path=args.data, babi_set=args.babi_set,
                          tasks=args.babi_tasks.split(","), variant=args.variant, chunks=chunks)
    task = build_task(task_cfg, args.split)
    samples = task.eval_size(args.samples)
    results = evaluate(reader, task, samples, steps, lr, seed=("evaluate", args.seed), batch_size=args.batch_size)
    generated = None
    if args.generate and args.task != "kv":  # the flag scores bAbI / SQuAD answers with their own metric
        generated, _ = evaluate_generated(reader, task, samples, lr=lr, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.batch_size)
    name = task.name
    print(f"reader {reader.fingerprint} ({reader.config.method})  task {name}  samples {samples}  write lr {lr}")
    print(f"{'K':>4} {'exact match':>12} {'token acc':>10} {'write loss':>11} {'recon acc':>10}")
    for k, r in results.items():
        print(f"{k:>4} {r['em']:>12.4f} {r['token_acc']:>10.4f} {r['write_loss']:>11.4f} {r['write_acc']:>10.4f}")
    if generated is not None:
        print(f"generated answers (K = {reader.config.write_steps}): "
              + ", ".join(f"{k.upper()} {v:.4f}" for k, v in generated.items()))
    out = {"reader": args.reader, "fingerprint": reader.fingerprint, "method": reader.config.method, "task": name,
           "pairs": args.pairs, "chunks": task_cfg.chunks, "samples": samples, "lr": lr,
           "results": {str(k): v for k, v in results.items()}, "generated": generated}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
