"""What every task offers the trainer and the evaluation: the ``Task`` protocol.

A task is either generated on the fly (key-value retrieval: ``KVTask``) or a fixed split of examples (bAbI,
SQuAD: ``ExampleSet``). Training draws batches as a pure function of a seed either way; evaluation asks the task
how many examples it covers and for each batch of them, so no caller branches on the kind of task.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from transformers import PreTrainedTokenizerBase

from gradmem.data import Batch, Example


class Task(Protocol):
    name: str  # for reports and logs

    def examples(self, n: int, seed: int | Sequence[int]) -> list[Example]:
        """``n`` training examples, a pure function of ``seed`` (pass e.g. ``[seed, rank, step]``)."""
        ...

    def batch(self, n: int, seed: int | Sequence[int], tokenizer: PreTrainedTokenizerBase) -> Batch:
        """The training batch of ``examples(n, seed)``."""
        ...

    def eval_size(self, samples: int, start: int = 0) -> int:
        """How many examples an evaluation of ``samples`` from ``start`` scores: a fixed split has at most its
        examples from ``start`` on (each counted once); a generator has as many as asked."""
        ...

    def eval_batch(self, start: int, n: int, seed: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> Batch:
        """Evaluation examples ``start`` .. ``start + n - 1``: a fixed split walks its examples in order (``seed``
        unused); a generator draws them from ``seed`` (``start`` unused), disjoint from any training seed."""
        ...
