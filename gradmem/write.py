"""WRITE: a few plain-SGD steps on per-sample memories, the model's weights frozen.

Per sample the loss is the mean cross-entropy of reconstructing its context given ``[M; C]``; the batch loss
is the sum over samples, so each sample's gradient (and update) is independent of the batch it sits in.

Modes
- ``second_order`` (meta-training default): ``create_graph=True`` at each step, so the outer loss
  differentiates through every update. ``second_order_steps=L`` keeps the second-order graph for the last L
  steps only; earlier steps use detached gradients.
- ``first_order``: detached inner gradients; the outer loss still reaches M0 through the identity path.
- ``inference``: M0 detached, no graph kept, no gradient for the model's weights: the cheap path used to
  write memories for storage and serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from gradmem.cell import MemoryCell

WriteMode = Literal["second_order", "first_order", "inference"]
WRITE_MODES = ("second_order", "first_order", "inference")


@dataclass
class WriteOutput:
    memory: torch.Tensor  # (B, m, d) memories after the last step
    losses: torch.Tensor  # (B, K) or (B, K + 1): write loss before each step, then after the last (if computed)
    accuracy: torch.Tensor | None  # (B,) teacher-forced reconstruction accuracy of the final memory
    last_step_loss: torch.Tensor | None  # scalar with graph: mean write loss of the last step (auxiliary loss)
    lengths: torch.Tensor | None = None  # (B,) real memory rows when they vary by sample (full_context); None: all


def check_write(mode: str, steps: int) -> None:
    """The WRITE's arguments, checked once per write (``gradmem.methods.write``, ``write_memory``)."""
    if mode not in WRITE_MODES:
        raise ValueError(f"unknown write mode {mode!r}; choose one of {WRITE_MODES}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def write_memory(
    cell: "MemoryCell",
    ctx_ids: torch.Tensor,  # (B, L)
    ctx_mask: torch.Tensor,  # (B, L)
    steps: int,
    lr: float,
    mode: WriteMode = "second_order",
    second_order_steps: int | None = None,
    final_stats: bool = True,
    keep_last_loss: bool = False,
) -> WriteOutput:
    """Run K SGD steps from the cell's learned M0 and return the memories with per-sample statistics (GradMem's
    WRITE whatever the cell's method: benchmarks and tests call it directly; everything else goes through
    ``gradmem.methods.write``)."""
    check_write(mode, steps)
    return gradient_steps(cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss)


def gradient_steps(
    cell: "MemoryCell",
    ctx_ids: torch.Tensor,  # (B, L)
    ctx_mask: torch.Tensor,  # (B, L)
    steps: int,
    lr: float,
    mode: WriteMode,
    second_order_steps: int | None,
    final_stats: bool,
    keep_last_loss: bool,
) -> WriteOutput:
    """The inner loop on checked arguments. The write loss sees ``cell.project(M)``, as the READ does."""
    n_second = steps if second_order_steps is None else max(0, min(steps, second_order_steps))
    batch = ctx_ids.shape[0]
    memory = cell.memory.unsqueeze(0).expand(batch, -1, -1)  # (B, m, d), one copy per sample
    if mode == "inference" or not torch.is_grad_enabled():  # no outer graph wanted (or possible)
        memory = memory.detach()

    step_losses: list[torch.Tensor] = []
    last_step_loss = None
    for k in range(steps):
        create_graph = mode == "second_order" and k >= steps - n_second
        keep = keep_last_loss and k == steps - 1 and mode != "inference"
        if not memory.requires_grad:  # inference, or training with a frozen M0
            memory = memory.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, _ = cell.write_loss(cell.project(memory), ctx_ids, ctx_mask)  # (B,)
            (grad,) = torch.autograd.grad(loss.sum(), memory, create_graph=create_graph, retain_graph=create_graph or keep)
        step_losses.append(loss.detach())
        if keep:
            last_step_loss = loss.mean()
        if mode == "inference":
            memory = (memory - lr * grad).detach()
        else:
            memory = memory - lr * grad  # grad is detached unless create_graph

    accuracy = None
    if final_stats:
        with torch.no_grad():
            loss, accuracy = cell.write_loss(cell.project(memory.detach()), ctx_ids, ctx_mask)
        step_losses.append(loss)
    losses = torch.stack(step_losses, dim=1) if step_losses else ctx_ids.new_zeros((batch, 0), dtype=torch.float32)
    return WriteOutput(memory=memory, losses=losses, accuracy=accuracy, last_step_loss=last_step_loss)
