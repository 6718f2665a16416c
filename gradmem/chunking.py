"""How a long document is split into chunks, each written into its own memory (issue 15).

A chunking is a chunk size in tokens and an overlap: chunk j holds tokens ``[j * s, j * s + tokens)`` with the
stride ``s = tokens - overlap``, and the last chunk is the first that reaches the end of the document, so every
chunk adds at least one token the one before it lacked and no token is dropped. The overlap repeats the tail of a
chunk at the head of the next, so a fact cut at a chunk border is whole in one of the two memories.

A memory store holds one chunking (``gradmem.records``: ``gradmem.chunk_tokens`` and ``gradmem.chunk_overlap`` in
each memories part's schema metadata, and the batch job's manifest): chunk numbers only mean something under the
chunking that made them, so the batch job refuses to add another chunking to a store, and the service reports its
store's chunking and refuses a query that assumes another. Parts written before chunkings were recorded hold
the reader's ``max_context_tokens`` per chunk with no overlap: the only chunking there was (``recorded``'s
``default``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pydantic import Field, model_validator

from gradmem.config import declared

METADATA_KEYS = ("chunk_tokens", "chunk_overlap")  # gradmem.<key> in a memories part's schema metadata


@declared
class Chunking:
    """A chunk size and an overlap, both in tokens (frozen, validated on construction)."""

    tokens: int = Field(ge=1, description="tokens per chunk (at most the reader's max_context_tokens)")
    overlap: int = Field(0, ge=0, description="tokens a chunk repeats from the end of the one before it")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "Chunking":
        if self.overlap >= self.tokens:
            raise ValueError(f"the overlap ({self.overlap} tokens) must be smaller than the chunk size "
                             f"({self.tokens} tokens): each chunk must add a token of its own")
        return self

    def split(self, ids: Sequence[int]) -> list[list[int]]:
        """``ids`` in chunks, in order (none for no tokens). Chunks start every ``tokens - overlap`` tokens, up to
        the first chunk that reaches the end."""
        stride = self.tokens - self.overlap
        last_start = max(len(ids) - self.overlap, 1)  # a later start would add no token of its own
        return [list(ids[k : k + self.tokens]) for k in range(0, last_start, stride)] if len(ids) else []

    def metadata(self) -> dict[str, str]:
        """The schema metadata entries (without the ``gradmem.`` prefix) that record this chunking."""
        return {"chunk_tokens": str(self.tokens), "chunk_overlap": str(self.overlap)}

    def describe(self) -> dict[str, int]:
        """As a manifest and the service's health route show it."""
        return {"chunk_tokens": self.tokens, "chunk_overlap": self.overlap}

    def __str__(self) -> str:
        return f"{self.tokens} tokens per chunk, overlap {self.overlap}"


def recorded(values: Mapping[str, Any], default: Chunking) -> Chunking:
    """The chunking that metadata or a manifest records (``chunk_tokens``, ``chunk_overlap``; strings or ints);
    ``default`` when it records none (written before chunkings were recorded)."""
    if values.get("chunk_tokens") is None:
        return default
    return Chunking(tokens=int(values["chunk_tokens"]), overlap=int(values.get("chunk_overlap") or 0))
