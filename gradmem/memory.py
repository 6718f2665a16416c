"""Memories written by a reader: the (B, m, d) tensor plus what a caller needs to trust and audit it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


# The arithmetic of an inference WRITE: float32, or bfloat16 autocast (matrix products in bf16, the loss and the
# memory in float32; the paper's key-value reader on an AMD EPYC with AVX-512 bf16, one thread, eager attention
# (gradmem.attention.write_attention): 1.55x float32's contexts/s, 1.95x compiled; docs/results/README.md). A
# bf16-written memory differs from the float32 one (largest difference 3e-3 of the largest value there), so the
# precision is part of the write setting and of every memory_id that is not float32.
WRITE_PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> str:
    if precision not in WRITE_PRECISIONS:
        raise ValueError(f"write precision must be one of {WRITE_PRECISIONS}, got {precision!r}")
    return precision


@dataclass(frozen=True)
class WriteSetting:
    """How memories are written: what, with the reader and the text, makes a memory (``records.memory_id``).

    ``steps`` is K (for an adaptive write the most a context takes), ``lr`` alpha; an adaptive write stops a
    context once its reconstruction accuracy reaches ``target`` (None: a fixed-K write), after at least
    ``min_steps``; ``precision`` is the WRITE's arithmetic (``WRITE_PRECISIONS``; the memory is float32 either
    way). One object, so that choosing a setting (``resolve``), content-addressing, checking a store against it and
    recording it (``gradmem.records``) all read the same five values."""

    steps: int
    lr: float
    target: float | None = None
    min_steps: int = 0
    precision: str = "float32"

    @classmethod
    def resolve(cls, defaults, steps: int | None = None, lr: float | None = None, target: float | None = None,
                min_steps: int | None = None, precision: str = "float32") -> "WriteSetting":
        """The setting a write with these arguments uses, checked: None takes the reader's own (``defaults``: a
        ``MemoryConfig`` or a ``ReaderSpec``: ``write_steps``, ``write_lr``, ``target_accuracy``,
        ``min_write_steps``); a reader's own floor applies only with a target."""
        from gradmem.write import check_write  # gradmem.write imports nothing of this module's

        steps = defaults.write_steps if steps is None else int(steps)
        lr = defaults.write_lr if lr is None else float(lr)
        target = defaults.target_accuracy if target is None else float(target)
        min_steps = (defaults.min_write_steps if target is not None else 0) if min_steps is None else int(min_steps)
        check_write("inference", steps, target, min_steps)
        return cls(steps, float(lr), target, min_steps, check_precision(precision))

    def describe(self) -> str:
        return (f"steps={self.steps}, lr={self.lr}, target={self.target}, min_steps={self.min_steps}, "
                f"precision={self.precision}")


@dataclass
class WriteStats:
    """Per-sample statistics of a WRITE (B samples, K steps)."""

    losses: torch.Tensor  # (B, K + 1): write loss before each SGD step, then after the last (after an adaptive
    # write's last step, the final loss repeated)
    accuracy: torch.Tensor  # (B,) teacher-forced reconstruction accuracy of the final memory
    n_tokens: torch.Tensor  # (B,) context tokens written
    steps_used: torch.Tensor | None = None  # (B,) int64 SGD steps each memory got; None: every one the fixed K

    def select(self, index: slice | list[int]) -> "WriteStats":
        used = self.steps_used[index] if self.steps_used is not None else None
        return WriteStats(self.losses[index], self.accuracy[index], self.n_tokens[index], used)


@dataclass
class Memories:
    """Memories for B contexts. ``fingerprint`` names the reader that wrote them; only that reader may read them;
    ``setting`` says how (an adaptive write's contexts differ in ``steps_used``, never in the setting)."""

    tensor: torch.Tensor  # (B, m, d), on CPU
    stats: WriteStats
    fingerprint: str
    setting: WriteSetting

    @property
    def steps_used(self) -> torch.Tensor:
        """(B,) int64 SGD steps each memory got (all ``setting.steps`` for a fixed-K write)."""
        if self.stats.steps_used is not None:
            return self.stats.steps_used
        return torch.full((len(self),), self.setting.steps, dtype=torch.long)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, index: int | slice | list[int]) -> "Memories":
        if isinstance(index, int):
            index = [index]
        return Memories(self.tensor[index], self.stats.select(index), self.fingerprint, self.setting)

    def finite(self) -> torch.Tensor:
        """(B,) True where the memory and its final write loss are finite."""
        ok = torch.isfinite(self.tensor).flatten(1).all(dim=1)
        if self.stats.losses.numel():
            ok &= torch.isfinite(self.stats.losses).all(dim=1)
        return ok


class NonFiniteWriteError(ValueError):
    """A WRITE produced NaN or inf for some contexts. Nothing is lost: the error carries every memory written
    and the indices of the bad ones, so a batch job can store the good ones and record the rest as errors."""

    def __init__(self, bad: list[int], memories: Memories):
        self.bad = bad
        self.memories = memories
        super().__init__(
            f"WRITE produced NaN/inf for contexts at indices {bad[:20]}{' ...' if len(bad) > 20 else ''} "
            f"({len(bad)} of {len(memories)}); lower the write lr or check the inputs"
        )
