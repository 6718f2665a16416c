"""The main job, end to end on this machine: meta-train a small key-value reader, evaluate it, and answer
questions from memories it wrote (the contexts are never shown to the reader when it answers).

    make demo                                   # sets up .venv, then runs the line below
    python jobs/demo.py --output runs/demo      # add --config to use another training config

Takes a few minutes on 2 CPU cores. Prints the learning progress, exact match per number of WRITE steps, and a
few answered queries.
"""

from __future__ import annotations

import argparse
import logging
import time

import _common  # noqa: F401
from _common import ROOT, setup_logging

from gradmem import Reader
from gradmem.tasks.kv import KVTask, exact_match
from gradmem.train import TrainConfig, Trainer

logger = logging.getLogger("demo")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "jobs/configs/kv_demo.yaml"))
    parser.add_argument("--output", default="runs/demo")
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args(argv)
    setup_logging()

    cfg = TrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        cfg.optim.max_steps = args.max_steps
    started = time.perf_counter()
    print(f"== 1/3 meta-training a reader on key-value retrieval with {cfg.task.pairs} pairs ({cfg.optim.max_steps} steps)")
    trainer = Trainer(cfg, args.output)
    export = trainer.fit()
    print(f"   trained in {time.perf_counter() - started:.0f}s; reader saved to {export}")

    reader = Reader.from_pretrained(export)
    k = reader.config.write_steps
    print(f"== 2/3 evaluating on held-out contexts (exact match; trained with K = {k} WRITE steps)")
    results = trainer.evaluate(sorted({0, 1, k, 2 * k}))
    for steps, r in results.items():
        print(f"   K = {steps}: exact match {r['em']:.3f}, token accuracy {r['token_acc']:.3f}")

    print("== 3/3 writing fresh contexts into memory, then answering from memory alone")
    examples = KVTask(cfg.task.pairs).examples(6, seed=[2026, 11])
    memories = reader.write([e.context for e in examples])
    answers = reader.answer(memories, [e.query for e in examples], max_new_tokens=4)
    for e, a in zip(examples, answers):
        mark = "ok" if exact_match(a, e.target) else "wrong"
        print(f"   context {e.context[:36]}{'...' if len(e.context) > 36 else ''}  query {e.query}  answer {a!r}  "
              f"(truth {e.target[:2]!r}, {mark})")
    correct = sum(exact_match(a, e.target) for a, e in zip(answers, examples))
    bytes_per_memory = memories.tensor[0].numel() * memories.tensor.element_size()
    print(f"== done in {time.perf_counter() - started:.0f}s: {correct}/{len(examples)} answered right; each memory is "
          f"{tuple(memories.tensor.shape[1:])} = {bytes_per_memory} bytes; reader {reader.fingerprint}")


if __name__ == "__main__":
    main()
