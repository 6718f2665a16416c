"""Answers that need no reasoning: how far a shortcut gets on a bAbI split, to read the trained methods against.

    python -m benchmarks.babi_heuristics --tasks qa1 --splits validation,test
    python -m benchmarks.babi_heuristics --tasks qa1,qa2 --json runs/babi_heuristics.json

The data come from ``GRADMEM_DATA`` (the directory holding babi/) or ``--path``.

A reader that scores what a shortcut scores has learned the shortcut, whatever it reads from: on qa1 every method
of ``benchmarks/configs/babi_qa1_cpu.yaml`` (full context included) plateaued at the "last sentence" figure below,
so that regime cannot tell the memories apart. The shortcuts:

- ``last_sentence``: the last word of the story's last statement (qa1's location in "X went to the Y.").
- ``most_frequent``: the answer most frequent in the training split, for every question.
- ``last_mention``: the last word of the last statement naming the question's last word stripped of "?" (qa1's
  person): what a reader that solved qa1 answers; 100% on qa1 by construction, a check of the parsing.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from gradmem.runtime import setup_logging
from gradmem.tasks.babi import BabiQuestion, exact_match, load_questions

logger = logging.getLogger(__name__)


def last_word(sentence: str) -> str:
    return sentence.rstrip(" .?").split()[-1]


def last_sentence(q: BabiQuestion) -> str:
    return last_word(q.facts[-1]) if q.facts else ""


def last_mention(q: BabiQuestion) -> str:
    """The location of the last statement naming the question's subject (its last word: "Where is Mary?")."""
    subject = last_word(q.question)
    named = [f for f in q.facts if subject in f.rstrip(" .").split()]
    return last_word(named[-1]) if named else ""


def accuracy(questions: Sequence[BabiQuestion], answer: Callable[[BabiQuestion], str]) -> float:
    return sum(exact_match(answer(q), q.answer) for q in questions) / len(questions)


def shortcuts(tasks: Sequence[str], splits: Sequence[str], babi_set: str, root: str | None) -> dict[str, dict[str, float]]:
    """{split: {shortcut: accuracy}} on the questions of ``tasks``."""
    train = load_questions(tasks, "train", babi_set, root)
    frequent = Counter(q.answer for q in train).most_common(1)[0][0]
    out: dict[str, dict[str, float]] = {}
    for split in splits:
        questions = load_questions(tasks, split, babi_set, root)
        out[split] = {"questions": len(questions),
                      "last_sentence": accuracy(questions, last_sentence),
                      "most_frequent": accuracy(questions, lambda q: frequent),
                      "last_mention": accuracy(questions, last_mention)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="qa1", help="comma-separated bAbI tasks")
    parser.add_argument("--splits", default="validation,test")
    parser.add_argument("--set", dest="babi_set", default="en-10k")
    parser.add_argument("--path", default=None, help="the tasks_1-20_v1-2 directory (default: $GRADMEM_DATA/babi/...)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    setup_logging()
    result = shortcuts(args.tasks.split(","), args.splits.split(","), args.babi_set, args.path)
    print("| split | questions | last sentence | most frequent answer | last mention (solved) |")
    print("|---|---|---|---|---|")
    for split, r in result.items():
        print(f"| {split} | {r['questions']} | {100 * r['last_sentence']:.1f} | {100 * r['most_frequent']:.1f} | "
              f"{100 * r['last_mention']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"tasks": args.tasks, "set": args.babi_set, "splits": result}, indent=2))


if __name__ == "__main__":
    main()
