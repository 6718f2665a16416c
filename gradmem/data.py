"""Examples and tensor batches shared by every task: context, query, target.

A context is one text or, for a long document, its chunks in order (``Example.context`` a tuple): each chunk is
written into its own memory by the same WRITE and the READ sees them composed (``gradmem.read.compose``). A batch
holds the chunks of all its documents as rows of one write call, document after document, and ``Batch.chunks``
says how many rows each document has.

All sequences are right-padded. With causal attention a real token never attends to a pad that follows it,
so writes and teacher-forced reads need no attention mask (which also keeps the fast SDPA kernels eligible);
the masks here only select which positions count in a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    """One context-removal example: WRITE sees ``context``; READ sees the memory, ``query`` and ``target``.

    ``context`` is one text, or a document's chunks in order, each written into its own memory."""

    context: str | tuple[str, ...]
    query: str
    target: str

    @property
    def chunks(self) -> tuple[str, ...]:
        """The texts written separately, in order (one for a plain context)."""
        return (self.context,) if isinstance(self.context, str) else tuple(self.context)


@dataclass
class Batch:
    """Token tensors for a batch of examples (B documents, N = sum of ``chunks`` contexts written)."""

    ctx_ids: torch.Tensor  # (N, Lc) context tokens, right-padded: each document's chunks in order, document by document
    ctx_mask: torch.Tensor  # (N, Lc) 1 on real context tokens
    read_ids: torch.Tensor  # (B, Lr) query tokens then target tokens, right-padded
    target_mask: torch.Tensor  # (B, Lr) 1 on target tokens (the READ loss positions)
    score_mask: torch.Tensor  # (B, Lr) 1 on target tokens that count for exact match
    chunks: torch.Tensor | None = None  # (B,) context rows per document; None: one each (N = B)

    def __len__(self) -> int:
        return self.read_ids.shape[0]  # documents (questions), not chunks

    def to(self, device: torch.device | str) -> "Batch":
        tensors = (self.ctx_ids, self.ctx_mask, self.read_ids, self.target_mask, self.score_mask)
        return Batch(*(t.to(device) for t in tensors), chunks=None if self.chunks is None else self.chunks.to(device))


def pad(seqs: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (B, L) ids and a (B, L) 0/1 mask."""
    width = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens: the memory, not a BOS, opens every sequence."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def collate(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, unscored: Sequence[str] = ()
) -> Batch:
    """Tokenize and pad examples. Target tokens whose text is in ``unscored`` are left out of exact match.
    Every chunk of every example becomes a context row; ``Batch.chunks`` counts them per example."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ctx_ids, ctx_mask = pad(tokenize(tokenizer, [text for e in examples for text in e.chunks]), pad_id)
    queries = tokenize(tokenizer, [e.query for e in examples])
    targets = tokenize(tokenizer, [e.target for e in examples])
    read_ids, _ = pad([q + t for q, t in zip(queries, targets)], pad_id)
    target_mask = torch.zeros_like(read_ids)
    score_mask = torch.zeros_like(read_ids)
    unscored_ids = set(tokenizer.convert_tokens_to_ids(list(unscored))) if unscored else set()
    for i, (q, t) in enumerate(zip(queries, targets)):
        target_mask[i, len(q) : len(q) + len(t)] = 1
        for j, tok in enumerate(t):
            score_mask[i, len(q) + j] = int(tok not in unscored_ids)
    chunks = torch.tensor([len(e.chunks) for e in examples], dtype=torch.long)
    return Batch(ctx_ids, ctx_mask, read_ids, target_mask, score_mask, chunks)


def check_chunks(chunks: Sequence[int]) -> tuple[int, int]:
    """``(lo, hi)``, a task's range of chunks per document, if 1 <= lo <= hi; else ValueError."""
    if len(chunks) != 2 or not 1 <= chunks[0] <= chunks[1]:
        raise ValueError(f"chunks must be [lo, hi] with 1 <= lo <= hi, got {list(chunks)}")
    return int(chunks[0]), int(chunks[1])


def split_units(units: Sequence[str], c: int) -> str | tuple[str, ...]:
    """``units`` (a story's sentences) as c chunks of consecutive units, as equal in size as they can be (the
    first ones one unit longer), each joined by single spaces; at most one chunk per unit. One chunk is the
    plain context string, exactly ``" ".join(units)``."""
    c = max(1, min(c, len(units)))
    size, extra = divmod(len(units), c)
    bounds = [j * size + min(j, extra) for j in range(c + 1)]  # chunk j is units[bounds[j] : bounds[j + 1]]
    texts = tuple(" ".join(units[bounds[j] : bounds[j + 1]]) for j in range(c))
    return texts[0] if c == 1 else texts
