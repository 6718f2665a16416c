"""The methods behind one writer/reader interface: GradMem, the RMT forward-only writer, and the two bounds.

A reader's ``config.method`` picks one. Training (``gradmem.train``), evaluation, ``Reader.write`` and
``Reader.answer`` call ``write`` and ``read_prefix`` here and never branch on the method themselves; this module
is the only place that does.

What a memory is, per method (``WriteOutput.memory`` (B, P, d), stored as ``Memories.tensor``):

- ``gradmem``: P = m vectors written by K SGD steps on the reconstruction loss (``gradmem.write``).
- ``rmt``: P = m vectors written by K forward passes of ``[M; C; M]``: the last layer's hidden states at the
  trailing m positions, through ``mem_proj`` when on, become the next M (the RMT "forward write": K = 1 is the
  paper's baseline, K > 1 "repeated forward writes"). As in the authors' recipe, RMT's ``mem_proj`` is a
  default-initialised ``nn.Linear`` with bias applied when writing, and the READ sees M as written. Same m and d
  as GradMem, so the memory size is matched. Trained end to end by backpropagating through every pass.
- ``full_context`` (upper bound): the context's own input embeddings, zero rows after the context's end.
  ``WriteOutput.lengths`` (and ``WriteStats.n_tokens`` in ``Memories``) say how many rows are real. A token's
  input embedding is exactly what the backbone sees for that token, so the READ sees ``[C; Q]``: no removal.
  ``Reader.write`` pads every such memory to ``reader.max_context_tokens`` rows, so all memories of a reader
  share one shape (one Parquet schema); that costs max_context_tokens x d numbers per context, which is fine
  for a bound that compresses nothing.
- ``no_context`` (lower bound): P = 0. The READ sees ``[Q]`` alone: no prefix positions at all, not m zero
  vectors (those would still be positions the model could learn to use as a bias).

READ input per sample: ``read_prefix`` rows (projected memory for gradmem, memory as written for rmt; the first n_tokens rows for
full_context; none for no_context), then the query (and the target when teacher-forcing). No context token is
ever fed to a READ except through full_context's prefix (tests/test_baselines.py checks it with hooks).

Write statistics (``WriteOutput.losses`` (B, S), ``accuracy`` (B,)):

- ``gradmem``: the write loss before each SGD step, then after the last (S = K + 1; S = K when training).
- ``rmt``: with ``final_stats`` (inference writes, evaluation) the reconstruction loss of M0 and of each pass's
  memory (S = K + 1), measured with the write head as GradMem's are, and the final memory's accuracy. These are
  diagnostics only: RMT's objective has no write loss, so its write head stays untrained. While training
  (``final_stats=False``) S = 0: they would cost an extra forward per pass.
- ``full_context``: S = 0, accuracy 1 (the memory is the context itself); ``no_context``: S = 0, accuracy 0.

The auxiliary write loss of meta-training (``OptimConfig.aux_write_loss``) exists only for GradMem: the other
writers return ``last_step_loss=None``. Write modes: ``inference`` writes without a graph for every method;
``first_order`` and ``second_order`` differ only for GradMem (RMT has no inner gradient; it keeps the graph
through its passes in both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

from gradmem.config import METHODS
from gradmem.write import WRITE_MODES, WriteMode, WriteOutput, write_memory

if TYPE_CHECKING:
    from gradmem.reader import Reader

# Methods whose training differentiates through an inner gradient (needs an attention path with double backward).
SECOND_ORDER_METHODS = ("gradmem",)


# ---------------------------------------------------------------------------------------------- dispatch
def write(
    reader: "Reader",
    ctx_ids: torch.Tensor,  # (B, L) right-padded
    ctx_mask: torch.Tensor,  # (B, L)
    steps: int,
    lr: float,
    mode: WriteMode = "second_order",
    second_order_steps: int | None = None,
    final_stats: bool = True,
    keep_last_loss: bool = False,
) -> WriteOutput:
    """Write each context into its memory with the reader's method. ``lr`` and ``second_order_steps`` only
    matter for GradMem; ``steps`` is the number of SGD steps (gradmem) or forward passes (rmt)."""
    if mode not in WRITE_MODES:
        raise ValueError(f"unknown write mode {mode!r}; choose one of {WRITE_MODES}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    method = reader.config.method
    if method == "gradmem":
        return write_memory(reader, ctx_ids, ctx_mask, steps, lr, mode=mode, second_order_steps=second_order_steps,
                            final_stats=final_stats, keep_last_loss=keep_last_loss)
    if method == "rmt":
        return write_rmt(reader, ctx_ids, ctx_mask, steps, mode=mode, final_stats=final_stats)
    if method == "full_context":
        return write_full_context(reader, ctx_ids, ctx_mask, mode=mode)
    if method == "no_context":
        return write_no_context(reader, ctx_ids)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def read_prefix(
    reader: "Reader", memory: torch.Tensor, n_tokens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the READ places before the query: (B, P, d) input embeddings and (B,) real rows per sample.

    ``memory`` (B, P, d) as written; ``n_tokens`` (B,) the context lengths, needed by full_context only."""
    return memory_input(reader, memory), prefix_lengths(reader, memory, n_tokens)


def memory_input(reader: "Reader", memory: torch.Tensor) -> torch.Tensor:
    """(B, P, d) -> (B, P, d): what the backbone sees for a written memory, at READ and in the write loss.

    GradMem projects M before every use; RMT's projection belongs to its write (already applied); the bounds'
    rows are token embeddings or nothing."""
    if reader.config.method == "gradmem":
        return reader.project(memory)  # (B, m, d)
    return memory


def prefix_lengths(reader: "Reader", memory: torch.Tensor, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) how many prefix rows of each memory the READ sees (cheap: no projection)."""
    batch, slots = memory.shape[0], memory.shape[1]
    if reader.config.method == "full_context":
        if n_tokens is None:
            raise ValueError("a full-context memory needs its context lengths (n_tokens) to be read")
        lengths = n_tokens.to(device=memory.device, dtype=torch.long)
        if bool((lengths > slots).any()):
            raise ValueError(f"context lengths {lengths.max().item()} exceed the memory's {slots} rows")
        return lengths
    return torch.full((batch,), slots, dtype=torch.long, device=memory.device)


def memory_slots(reader: "Reader") -> int:
    """Rows P of every memory this reader stores: m, the longest context (full_context) or 0 (no_context)."""
    method = reader.config.method
    if method == "full_context":
        return reader.max_context_tokens
    if method == "no_context":
        return 0
    return reader.num_memory


def write_overhead(reader: "Reader") -> int:
    """Positions a WRITE adds around the context: m for ``[M; C]``, 2m for RMT's ``[M; C; M]``, none for the
    bounds (whose READ length the answer checks per question)."""
    method = reader.config.method
    if method == "gradmem":
        return reader.num_memory
    if method == "rmt":
        return 2 * reader.num_memory
    return 0


# ---------------------------------------------------------------------------------------------- writers
def write_rmt(
    reader: "Reader", ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, steps: int, mode: WriteMode = "second_order",
    final_stats: bool = True,
) -> WriteOutput:
    """RMT-style forward writes: K passes of ``[M_k; C; M_k]``, M_{k+1} = last hidden states at the trailing m slots.

    Each pass re-reads the whole context with the current memory as both prefix and trailing slots. Training
    keeps the graph through every pass (backprop through the forward writes); ``inference`` runs without one."""
    batch = ctx_ids.shape[0]
    lengths = ctx_mask.sum(dim=1)  # (B,) contexts are right-padded
    build_graph = mode != "inference" and torch.is_grad_enabled()
    memory = reader.memory.unsqueeze(0).expand(batch, -1, -1)  # (B, m, d) M0 for every sample
    if not build_graph:
        memory = memory.detach()
    trajectory = [memory]
    with torch.set_grad_enabled(build_graph):
        for _ in range(steps):
            memory = rmt_pass(reader, memory, ctx_ids, lengths)
            trajectory.append(memory)

    losses = ctx_ids.new_zeros((batch, 0), dtype=torch.float32)
    accuracy = None
    if final_stats:
        with torch.no_grad():
            stats = [reader.write_loss(mem.detach(), ctx_ids, ctx_mask) for mem in trajectory]
        losses = torch.stack([loss for loss, _ in stats], dim=1)  # (B, K + 1)
        accuracy = stats[-1][1]  # (B,)
    return WriteOutput(memory=memory, losses=losses, accuracy=accuracy, last_step_loss=None)


def rmt_pass(reader: "Reader", memory: torch.Tensor, ctx_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One forward write: (B, m, d) memory, (B, L) right-padded context, (B,) lengths -> (B, m, d) new memory.

    Each sample is packed as ``[M; C_i; M]`` and only then right-padded, so the trailing slots follow the
    sample's own last token (never pads) and sit at the positions they would have if written alone."""
    m, d = memory.shape[1], memory.shape[2]
    tokens = reader.lm.get_input_embeddings()(ctx_ids)  # (B, L, d)
    slots = memory.to(tokens.dtype)  # (B, m, d)
    if bool((lengths == ctx_ids.shape[1]).all()):  # no padding: one concatenation
        embeds = torch.cat([slots, tokens, slots], dim=1)  # (B, 2m + L, d)
    else:
        seqs = [torch.cat([slots[i], tokens[i, :n], slots[i]]) for i, n in enumerate(lengths.tolist())]  # (2m + L_i, d)
        embeds = pad_sequence(seqs, batch_first=True)  # (B, 2m + max L_i, d)
    hidden = reader.last_hidden(embeds)  # (B, 2m + max L_i, d)
    index = (m + lengths)[:, None] + torch.arange(m, device=lengths.device)  # (B, m): the trailing slots
    return reader.project(hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, d)))  # (B, m, d)


def write_full_context(
    reader: "Reader", ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, mode: WriteMode = "second_order"
) -> WriteOutput:
    """Upper bound: the memory is the context's input embeddings (B, L, d), pads zeroed; lengths say how many
    rows are real. With a graph when training, so the READ's gradient reaches the embeddings through it."""
    batch = ctx_ids.shape[0]
    build_graph = mode != "inference" and torch.is_grad_enabled()
    with torch.set_grad_enabled(build_graph):
        tokens = reader.lm.get_input_embeddings()(ctx_ids)  # (B, L, d)
        memory = tokens * ctx_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, d)
    return WriteOutput(
        memory=memory, losses=ctx_ids.new_zeros((batch, 0), dtype=torch.float32),
        accuracy=torch.ones(batch, device=ctx_ids.device), last_step_loss=None, lengths=ctx_mask.sum(dim=1),
    )


def write_no_context(reader: "Reader", ctx_ids: torch.Tensor) -> WriteOutput:
    """Lower bound: an empty memory (B, 0, d). The context is not even embedded."""
    batch = ctx_ids.shape[0]
    memory = reader.memory.new_zeros((batch, 0, reader.d_model)).detach()  # (B, 0, d)
    return WriteOutput(
        memory=memory, losses=ctx_ids.new_zeros((batch, 0), dtype=torch.float32),
        accuracy=torch.zeros(batch, device=ctx_ids.device), last_step_loss=None,
        lengths=torch.zeros(batch, dtype=torch.long, device=ctx_ids.device),
    )
