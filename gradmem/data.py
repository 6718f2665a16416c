"""Examples and tensor batches shared by every task: context, query, target.

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
    """One context-removal example: WRITE sees ``context``; READ sees the memory, ``query`` and ``target``."""

    context: str
    query: str
    target: str


@dataclass
class Batch:
    """Token tensors for a batch of examples (B samples)."""

    ctx_ids: torch.Tensor  # (B, Lc) context tokens, right-padded
    ctx_mask: torch.Tensor  # (B, Lc) 1 on real context tokens
    read_ids: torch.Tensor  # (B, Lr) query tokens then target tokens, right-padded
    target_mask: torch.Tensor  # (B, Lr) 1 on target tokens (the READ loss positions)
    score_mask: torch.Tensor  # (B, Lr) 1 on target tokens that count for exact match

    def __len__(self) -> int:
        return self.ctx_ids.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.ctx_ids, self.ctx_mask, self.read_ids, self.target_mask, self.score_mask)))


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
    """Tokenize and pad examples. Target tokens whose text is in ``unscored`` are left out of exact match."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ctx_ids, ctx_mask = pad(tokenize(tokenizer, [e.context for e in examples]), pad_id)
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
    return Batch(ctx_ids, ctx_mask, read_ids, target_mask, score_mask)
