"""WRITE: a few plain-SGD steps on per-sample memories, the model's weights frozen.

Per sample the loss is the mean cross-entropy of reconstructing its context given ``[M; C]``; the batch loss
is the sum over samples, so each sample's gradient (and update) is independent of the batch it sits in.

Modes
- ``second_order`` (meta-training default): ``create_graph=True`` at each step, so the outer loss
  differentiates through every update. ``second_order_steps=L`` keeps the second-order graph for the last L
  steps only; earlier steps use detached gradients.
- ``first_order``: detached inner gradients; the outer loss still reaches M0 through the identity path.
- ``inference``: M0 detached, no graph kept, no gradient for the model's weights: the cheap path used to
  write memories for storage and serving (``inference_steps``).

Adaptive writes (inference only): with a ``target`` accuracy, each context is written for at least ``min_steps``
steps, then until the teacher-forced reconstruction accuracy of its memory reaches the target, or for ``steps``
(K_max) steps. ``min_steps`` keeps the memories the READ was trained on (K_train steps: fewer collapse accuracy)
while the target decides which contexts get more. The accuracy of M_k is read off the forward pass that step k
needs anyway for its gradient (the write loss's argmax), so checking costs nothing extra; a context that reached
the target leaves the batch (its rows are index-selected away, and the padding they needed is trimmed), so
finished contexts stop costing compute. ``WriteOutput.steps_used`` says how
many SGD steps each memory got; a write whose target is never reached is the fixed-K write.
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
    steps_used: torch.Tensor | None = None  # (B,) int64 SGD steps each memory got (adaptive writes); None: all K


def check_write(mode: str, steps: int, target: float | None = None, min_steps: int = 0) -> None:
    """The WRITE's arguments, checked once per write (``gradmem.methods.write``, ``write_memory``)."""
    if mode not in WRITE_MODES:
        raise ValueError(f"unknown write mode {mode!r}; choose one of {WRITE_MODES}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if target is not None:
        check_target(target)
        if mode != "inference":
            raise ValueError(f"an adaptive write (target accuracy {target}) is an inference write; mode {mode!r} "
                             "trains through a fixed number of steps")
    if min_steps and target is None:
        raise ValueError(f"min_steps={min_steps} without a target accuracy: a fixed-K write takes exactly K steps")
    if not 0 <= min_steps <= steps:
        raise ValueError(f"min_steps must be in [0, steps={steps}], got {min_steps}")


def check_target(target: float) -> None:
    """An adaptive write's target: a reconstruction accuracy in (0, 1] (``MemoryConfig.target_accuracy`` declares
    the same range)."""
    if not 0 < target <= 1:
        raise ValueError(f"target accuracy must be in (0, 1], got {target}")


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
    target: float | None = None,
    min_steps: int = 0,
) -> WriteOutput:
    """Run K SGD steps from the cell's learned M0 and return the memories with per-sample statistics (GradMem's
    WRITE whatever the cell's method: benchmarks and tests call it directly; everything else goes through
    ``gradmem.methods.write``). ``target``: an adaptive write (inference only), ``min_steps`` to K = ``steps``."""
    check_write(mode, steps, target, min_steps)
    return gradient_steps(cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss,
                          target, min_steps)


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
    target: float | None = None,
    min_steps: int = 0,
) -> WriteOutput:
    """The inner loop on checked arguments. The write loss sees ``cell.project(M)``, as the READ does."""
    if mode == "inference":
        return inference_steps(cell, ctx_ids, ctx_mask, steps, lr, final_stats, target, min_steps)
    n_second = steps if second_order_steps is None else max(0, min(steps, second_order_steps))
    batch = ctx_ids.shape[0]
    # (B, m, d), one copy per sample; contiguous, as every later M_k is (a compiled step would compile twice)
    memory = cell.memory.unsqueeze(0).expand(batch, -1, -1).contiguous()
    if not torch.is_grad_enabled():  # no outer graph possible (evaluation under no_grad)
        memory = memory.detach()

    step_losses: list[torch.Tensor] = []
    last_step_loss = None
    for k in range(steps):
        create_graph = mode == "second_order" and k >= steps - n_second
        keep = keep_last_loss and k == steps - 1
        grad, loss, memory = inner_gradient(cell, memory, ctx_ids, ctx_mask, create_graph, keep)
        step_losses.append(loss.detach())
        if keep:
            last_step_loss = loss.mean()
        memory = memory - lr * (grad if create_graph else grad.detach())

    accuracy = None
    if final_stats:
        with torch.no_grad():
            loss, accuracy = cell.write_loss(cell.project(memory.detach()), ctx_ids, ctx_mask)
        step_losses.append(loss)
    losses = torch.stack(step_losses, dim=1) if step_losses else ctx_ids.new_zeros((batch, 0), dtype=torch.float32)
    return WriteOutput(memory=memory, losses=losses, accuracy=accuracy, last_step_loss=last_step_loss)


def inner_gradient(
    cell: "MemoryCell", memory: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, create_graph: bool, keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's gradient of the write loss at M_k (B, m, d), its loss (B,), and M_k as differentiated (B, m, d).

    With ``torch.autograd`` (``create_graph`` for a second-order step; the loss's graph kept for the auxiliary
    loss when ``keep``), or, after ``compile_write_step``, with the cell's compiled ``torch.func.grad`` step, which
    records the outer graph only where it is used. Both are tested equal (tests/test_write.py)."""
    if cell.compiled_write_gradient is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and (create_graph or keep)):
            grad, loss = cell.compiled_write_gradient(memory, ids, mask)
        return grad, loss, memory
    if not memory.requires_grad:  # under no_grad, or training with a frozen M0
        memory = memory.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, _ = cell.write_loss(cell.project(memory), ids, mask)  # (B,)
        (grad,) = torch.autograd.grad(loss.sum(), memory, create_graph=create_graph, retain_graph=create_graph or keep)
    return grad, loss, memory


def inference_steps(
    cell: "MemoryCell",
    ctx_ids: torch.Tensor,  # (B, L) right-padded
    ctx_mask: torch.Tensor,  # (B, L)
    steps: int,
    lr: float,
    final_stats: bool = True,
    target: float | None = None,
    min_steps: int = 0,
) -> WriteOutput:
    """The inference WRITE: K first-order SGD steps without a graph, or, with ``target``, each context for
    ``min_steps`` steps, then until the accuracy of its memory reaches ``target`` (then it leaves the batch) or
    for K = ``steps`` steps.

    One loop for both, so a target that is never reached gives the fixed-K write exactly. Row i's memory M_k is
    measured by the forward of step k (loss and accuracy, both per sample); when it meets the target, M_k is
    final, ``steps_used[i] = k`` and its later losses repeat the final one (the memory no longer changes). The
    backward of that step is shared with the rows still writing (one batched graph), so a finished row costs that
    one backward; from the next step on it has left the batch (rows index-selected away, padding trimmed) and costs
    nothing. When every row is finished no backward runs. M_K, after the last step, is measured by the
    final-statistics forward, as in the fixed-K write."""
    batch = ctx_ids.shape[0]
    memory = cell.memory.detach().unsqueeze(0).expand(batch, -1, -1).clone()  # (B, m, d) final memories
    losses = ctx_ids.new_zeros((batch, steps + (1 if final_stats else 0)), dtype=torch.float32)
    accuracy = ctx_ids.new_zeros(batch, dtype=torch.float32)
    steps_used = torch.full((batch,), steps, dtype=torch.long, device=ctx_ids.device)
    active = torch.arange(batch, device=ctx_ids.device)  # (b,) rows still writing
    current, ids, mask = memory.clone(), ctx_ids, ctx_mask  # (b, m, d), (b, L'), (b, L')
    # A compiled backbone measures M_K with gradients on, as its steps do: dynamo guards on grad mode, and a
    # forward without them would compile the whole backbone a second time (measured on a cold Inductor cache:
    # tests/test_write.py's compiled write test 73 s -> 49 s). Eager skips the graph it would not use.
    same_graph = cell.compiled
    for k in range(steps + 1 if final_stats else steps):
        stepping = k < steps
        current = current.detach().requires_grad_(stepping or same_graph)
        with torch.set_grad_enabled(stepping or same_graph):
            loss, acc = cell.write_loss(cell.project(current), ids, mask)  # (b,), (b,)
        losses[active, k] = loss.detach().float()
        if not stepping:  # M_K, measured after the last step: the final statistics
            accuracy[active] = acc.float()
            break
        done = acc >= target if target is not None and k >= min_steps else None  # (b,) M_k is final for these
        if done is not None and bool(done.all()):  # nothing left to step: no backward at all
            _finish(memory, accuracy, steps_used, losses, active, current, acc, loss, k)
            active, current = active[:0], current[:0]
            break
        with torch.enable_grad():  # callers may hold no_grad (evaluation)
            (grad,) = torch.autograd.grad(loss.sum(), current)  # (b, m, d): finished rows share it this once
        stepped = (current - lr * grad).detach()  # (b, m, d) M_{k+1}
        if done is not None and bool(done.any()):
            _finish(memory, accuracy, steps_used, losses, active[done], current[done], acc[done], loss[done], k)
            keep = ~done  # (b,)
            active, stepped = active[keep], stepped[keep]
            ids, mask = trim_padding(ids[keep], mask[keep])
        current = stepped
    memory[active] = current.detach()
    return WriteOutput(memory=memory, losses=losses, accuracy=accuracy if final_stats else None, last_step_loss=None,
                       steps_used=steps_used)


def _finish(
    memory: torch.Tensor, accuracy: torch.Tensor, steps_used: torch.Tensor, losses: torch.Tensor,
    rows: torch.Tensor, final: torch.Tensor, acc: torch.Tensor, loss: torch.Tensor, k: int,
) -> None:
    """Record rows (r,) whose memory ``final`` (r, m, d) = M_k met the target: memory, accuracy, k steps, and the
    final loss (r,) repeated for the steps they skip."""
    memory[rows] = final.detach()
    accuracy[rows] = acc.float()
    steps_used[rows] = k
    losses[rows, k + 1 :] = loss.detach().float().unsqueeze(1)


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, L) right-padded ids and mask cut to the longest remaining context: causal and unmasked, a row never
    sees the columns after its end, so the cut changes no result and saves the compute of the padding."""
    longest = int(mask.sum(dim=1).max())
    return ids[:, :longest], mask[:, :longest]
