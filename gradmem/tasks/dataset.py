"""Tasks over a fixed list of examples (bAbI, SQuAD) behind the ``Task`` protocol (gradmem/tasks/base.py):
``examples(n, seed)``, ``batch(n, seed, tokenizer)``, ``eval_size`` and ``eval_batch``.

Training batches are drawn with replacement by ``np.random.default_rng(seed)``, so a batch is a pure function of
(seed, rank, step) exactly as for generated key-value data, and a resumed run sees the batches it would have
seen. Evaluation walks the split in order instead (``ordered``), so every example counts once.

Targets get the tokenizer's end-of-sequence token appended when the batch is built (``answer_eos``): the READ
then learns where an answer ends, which greedy answers need (``Reader.answer`` stops at EOS). That token is in
the READ loss but not in exact match, which counts the answer's own tokens only, as the paper does.

Multi-chunk form (``chunks=(lo, hi)``, hi > 1; the task gives each example's ``units``, e.g. a bAbI story's
sentences): each example's context is split into c chunks of consecutive units (``gradmem.data.split_units``),
each written into its own memory. Training draws c uniformly from [lo, hi] per example, after the example
indices (so the examples are those of the one-chunk stream); evaluation cycles c = lo, lo + 1, .., hi over the
split in order, so every c is scored on a fixed share of it. c is capped by the example's number of units, and
c = 1 is the example exactly as stored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from gradmem.data import Batch, Example, check_chunks, collate, split_units

if TYPE_CHECKING:
    from gradmem.reader import Reader

DATA_ENV = "GRADMEM_DATA"  # the released data directory: babi/tasks_1-20_v1-2/ and squad/dev-v1.1.json


def data_root(files: str) -> Path:
    """The released data directory named by ``$GRADMEM_DATA``: where a task finds its files when the config gives
    no ``task.path``. The data are not shipped with the code, so there is no guessed default: with neither set,
    a FileNotFoundError says both ways to point at ``files`` (the directory or file ``task.path`` would name)."""
    root = os.environ.get(DATA_ENV)
    if not root:
        raise FileNotFoundError(f"no data for this task: set the config's task.path to {files}, or the {DATA_ENV} "
                                f"environment variable to the released data directory (it holds babi/ and squad/)")
    return Path(root)


def read_text(path: Path) -> str:
    """A released data file's text: a file that is not UTF-8 is one ValueError naming it and where it breaks."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None


# prediction, gold answers -> metric name -> value in [0, 1]
Metric = Callable[[str, Sequence[str]], dict[str, float]]


class ExampleSet:
    """One split of a fixed dataset: the examples, each with its gold answers, and the task's metric. A ``Task``."""

    def __init__(self, name: str, examples: Sequence[Example], golds: Sequence[Sequence[str]], metric: Metric,
                 answer_eos: bool = True, units: Sequence[Sequence[str]] | None = None,
                 chunks: Sequence[int] = (1, 1)):
        if len(examples) != len(golds):
            raise ValueError(f"{name}: {len(examples)} examples but {len(golds)} gold answer lists")
        if not examples:
            raise ValueError(f"{name}: no examples")
        self.chunks = check_chunks(chunks)
        if self.chunks != (1, 1) and (units is None or len(units) != len(examples)):
            raise ValueError(f"{name}: this task cannot split its contexts into chunks (no units to split at)")
        self.name = name
        self.items: tuple[Example, ...] = tuple(examples)
        self.golds: tuple[tuple[str, ...], ...] = tuple(tuple(g) for g in golds)
        self.metric = metric
        self.answer_eos = answer_eos
        self.units: tuple[tuple[str, ...], ...] | None = None if units is None else tuple(tuple(u) for u in units)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ExampleSet({self.name!r}, {len(self)} examples)"

    def examples(self, n: int, seed: int | Sequence[int]) -> list[Example]:
        """``n`` examples drawn with replacement by ``np.random.default_rng(seed)`` (the training stream)."""
        rng = np.random.default_rng(seed)
        index = rng.integers(0, len(self.items), size=n).tolist()
        lo, hi = self.chunks
        counts = [lo] * n if lo == hi else rng.integers(lo, hi + 1, size=n).tolist()  # after the indices
        return [self.chunked(i, c) for i, c in zip(index, counts)]

    def ordered(self, start: int, n: int) -> list[Example]:
        """Examples ``start`` .. ``start + n - 1`` in split order (evaluation); example k in c = lo + k mod the
        range's size chunks."""
        lo, hi = self.chunks
        return [self.chunked(k, lo + k % (hi - lo + 1)) for k in range(start, min(start + n, len(self)))]

    def chunked(self, index: int, c: int) -> Example:
        """Example ``index`` with its context in c chunks (at most one per unit); c = 1: as stored."""
        item = self.items[index]
        if c == 1:
            return item
        return Example(split_units(self.units[index], c), item.query, item.target)

    def collate(self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> Batch:
        eos = tokenizer.eos_token if self.answer_eos else None
        if eos is None:
            return collate(examples, tokenizer)
        ended = [Example(e.context, e.query, e.target + eos) for e in examples]
        return collate(ended, tokenizer, unscored=(eos,))

    def batch(self, n: int, seed: int | Sequence[int], tokenizer: PreTrainedTokenizerBase) -> Batch:
        return self.collate(self.examples(n, seed), tokenizer)

    def ordered_batch(self, start: int, n: int, tokenizer: PreTrainedTokenizerBase) -> Batch:
        return self.collate(self.ordered(start, n), tokenizer)

    def eval_size(self, samples: int, start: int = 0) -> int:
        return max(0, min(samples, len(self) - start))  # each example counted once

    def eval_batch(self, start: int, n: int, seed: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> Batch:
        return self.ordered_batch(start, n, tokenizer)  # walked in split order; the seed is not needed

    def texts(self) -> Iterator[str]:
        """Every context, query and target: what a word-level tokenizer is built from."""
        for e in self.items:
            yield e.context
            yield e.query
            yield e.target

    def score(self, predictions: Sequence[str], start: int = 0) -> dict[str, float]:
        """Mean of the task's metric over ``predictions`` for the examples from ``start`` on."""
        if start + len(predictions) > len(self):
            raise ValueError(f"{len(predictions)} predictions from {start} overrun the {len(self)} examples")
        totals: dict[str, float] = {}
        for i, prediction in enumerate(predictions):
            for key, value in self.metric(prediction, self.golds[start + i]).items():
                totals[key] = totals.get(key, 0.0) + value
        return {k: v / max(1, len(predictions)) for k, v in totals.items()}


def evaluate_generated(
    reader: "Reader", task: ExampleSet, samples: int, steps: int | None = None, lr: float | None = None,
    max_new_tokens: int = 16, batch_size: int = 64, start: int = 0,
) -> tuple[dict[str, float], list[str]]:
    """Write the contexts (every chunk of a multi-chunk document), answer the queries greedily from memory alone
    (a document's memories composed), and score the answers with the task's metric (bAbI exact match; SQuAD's
    normalised EM and F1). Returns the scores and the answers."""
    examples = task.ordered(start, samples)
    memories = reader.write([text for e in examples for text in e.chunks], steps=steps, lr=lr, batch_size=batch_size)
    answers = reader.answer(memories, [e.query for e in examples], max_new_tokens=max_new_tokens, batch_size=batch_size,
                            chunks=[len(e.chunks) for e in examples])
    return task.score(answers, start), answers
