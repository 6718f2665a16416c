"""Memory settings of a reader: how many vectors, which heads, and the default WRITE.

They live in the reader's ``config.json`` under the key ``"gradmem"`` so that a checkpoint directory stays a
valid Hugging Face model directory and carries everything a writer or a server needs to agree on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# How a reader turns a context into memory and reads it back (see gradmem/methods.py):
#   gradmem       the paper's method: m vectors written by K SGD steps on the reconstruction loss
#   rmt           forward-only writes: K passes of [M; C; M], the trailing m hidden states become M
#   full_context  upper bound: the READ sees the context itself, [C; Q]
#   no_context    lower bound: the READ sees the query alone, [Q]
METHODS = ("gradmem", "rmt", "full_context", "no_context")


@dataclass
class MemoryConfig:
    """Memory and WRITE settings (the paper's defaults)."""

    num_memory: int = 8  # m: prefix vectors in input-embedding space
    mem_proj: bool = False  # learned d x d preconditioner (identity init) applied before every use of M
    write_head: bool = True  # separate vocabulary projection for the write loss (copy of the LM head)
    write_steps: int = 2  # K: SGD steps per WRITE unless the caller says otherwise
    write_lr: float = 0.04  # alpha: inner-loop step size
    max_context_tokens: int = 1024  # longest context a WRITE accepts
    answer_stop: list[str] = field(default_factory=list)  # extra stop strings for greedy answers (besides EOS)
    method: str = "gradmem"  # one of METHODS; training, writing and reading all dispatch on it

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.num_memory < 1:
            raise ValueError(f"num_memory must be >= 1, got {self.num_memory}")
        if self.write_steps < 0:
            raise ValueError(f"write_steps must be >= 0, got {self.write_steps}")
        if not self.write_lr > 0:
            raise ValueError(f"write_lr must be > 0, got {self.write_lr}")
        if self.max_context_tokens < 2:
            raise ValueError(f"max_context_tokens must be >= 2, got {self.max_context_tokens}")
        self.answer_stop = list(self.answer_stop)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryConfig":
        return from_dict(cls, data)


def from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a dict, refusing unknown keys (a typo in a config must not pass silently)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
    return cls(**data)
