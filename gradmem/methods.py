"""The methods behind one writer/reader interface: GradMem, the RMT forward-only writer, and the two bounds.

Each method is one object implementing ``Method``, registered by name (``register``); a reader's
``config.method`` picks one (``of(cell)``). Training (``gradmem.train``), evaluation, ``Reader.write`` and
``Reader.answer`` call ``write`` and ``read_prefix`` here and never branch on the method themselves: adding a
method is registering one object (tests/test_methods.py registers a toy one).

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
  ``Reader.write`` pads every such memory to ``max_context_tokens`` rows, so all memories of a reader share one
  shape (one Parquet schema); that costs max_context_tokens x d numbers per context, which is fine for a bound
  that compresses nothing.
- ``no_context`` (lower bound): P = 0. The READ sees ``[Q]`` alone: no prefix positions at all, not m zero
  vectors (those would still be positions the model could learn to use as a bias).

READ input per sample: ``read_prefix`` rows (projected memory for gradmem, memory as written for rmt; the first
n_tokens rows for full_context; none for no_context), then the query (and the target when teacher-forcing). No
context token is ever fed to a READ except through full_context's prefix (tests/test_baselines.py checks it).
A document written as several chunks is read through each chunk's ``read_prefix`` rows concatenated in order
(``gradmem.read.compose``), the same for every method: full_context's composed prefix is the whole document.

Write statistics (``WriteOutput.losses`` (B, S), ``accuracy`` (B,)):

- ``gradmem``: the write loss before each SGD step, then after the last (S = K + 1; S = K when training).
- ``rmt``: with ``final_stats`` (inference writes, evaluation) the reconstruction loss of M0 and of each pass's
  memory (S = K + 1), measured with the write head as GradMem's are, and the final memory's accuracy. These are
  diagnostics only: RMT's objective has no write loss, so its write head stays untrained. While training
  (``final_stats=False``) S = 0: they would cost an extra forward per pass.
- ``full_context``: S = 0, accuracy 1 (the memory is the context itself); ``no_context``: S = 0, accuracy 0.

Adaptive writes (``target``: write each context until its reconstruction accuracy reaches the target, at most
K steps; ``gradmem.write.inference_steps``) exist for methods whose ``adaptive`` attribute is true: GradMem.
``write`` refuses a target for the others (RMT's passes could stop early too, but its write head is untrained,
so its accuracy says nothing; the bounds have no steps), and a method without the attribute counts as false.

The auxiliary write loss of meta-training (``OptimConfig.aux_write_loss``) exists only for GradMem: the other
writers return ``last_step_loss=None``. Write modes: ``inference`` writes without a graph for every method;
``first_order`` and ``second_order`` differ only for GradMem (RMT has no inner gradient; it keeps the graph
through its passes in both).

Import direction: this module uses the memory cell's tensor primitives (``gradmem.cell``) and GradMem's inner
loop (``gradmem.write``); neither imports it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from gradmem import config
from gradmem.write import WriteMode, WriteOutput, check_write, gradient_steps

if TYPE_CHECKING:
    from gradmem.cell import MemoryCell


class Method(Protocol):
    """A way to turn B contexts into memories (B, P, d) and to place a memory before a READ's query."""

    name: str  # the ``MemoryConfig.method`` string: saved in reader directories, never renamed
    has_memory: bool  # a learned M0 of m vectors is written per context (gradmem, rmt); the bounds have none
    second_order: bool  # training differentiates an inner gradient (needs an attention path with double backward)
    projection_bias: bool  # ``mem_proj`` (when on) is a biased default-init Linear, else a bias-free identity init
    # optional, False when absent: ``write`` accepts ``target=`` (an adaptive write; see the module docstring)
    # adaptive: bool

    def write(
        self, cell: "MemoryCell", ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, steps: int, lr: float,
        mode: WriteMode, second_order_steps: int | None, final_stats: bool, keep_last_loss: bool,
    ) -> WriteOutput:
        """(B, L) right-padded contexts and their mask -> memories (B, P, d) and per-sample statistics.
        Arguments are already validated (``write`` below does it once)."""
        ...

    def memory_input(self, cell: "MemoryCell", memory: torch.Tensor) -> torch.Tensor:
        """(B, P, d) memory as stored -> (B, P, d) what the backbone sees for it (READ, write loss)."""
        ...

    def prefix_lengths(self, memory: torch.Tensor, n_tokens: torch.Tensor | None) -> torch.Tensor:
        """(B,) rows of each memory the READ sees; ``n_tokens`` (B,) the context lengths the memories were
        written from. Raises ValueError when they do not fit the memory."""
        ...

    def memory_slots(self, num_memory: int, max_context_tokens: int) -> int:
        """Rows P of every stored memory, given m and the longest context the reader writes."""
        ...

    def write_overhead(self, num_memory: int) -> int:
        """Positions a WRITE adds around the context (the context limit is the backbone's positions minus this)."""
        ...


# ---------------------------------------------------------------------------------------------- registry
REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available under ``method.name`` (``MemoryConfig.method``) and return it; a name already
    taken by another object is refused (a saved reader's method must mean one thing)."""
    known = REGISTRY.get(method.name)
    if known is not None and known is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    if method.name not in config.METHODS:  # MemoryConfig validates names against config.METHODS: keep it in step
        config.METHODS = config.METHODS + (method.name,)
    return method


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(REGISTRY)}") from None


def of(cell: "MemoryCell") -> Method:
    """The method of a memory cell (its ``config.method``)."""
    return get(cell.config.method)


# ---------------------------------------------------------------------------------------------- entry points
def write(
    cell: "MemoryCell",
    ctx_ids: torch.Tensor,  # (B, L) right-padded
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
    """Write each context into its memory with the cell's method. ``lr`` and ``second_order_steps`` only
    matter for GradMem; ``steps`` is the number of SGD steps (gradmem) or forward passes (rmt), the most an
    adaptive write (``target``, at least ``min_steps``; inference only) takes."""
    check_write(mode, steps, target, min_steps)
    method = of(cell)
    if target is None:
        return method.write(cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss)
    if not getattr(method, "adaptive", False):
        raise ValueError(f"method {method.name!r} has no adaptive write: leave the target accuracy unset")
    return method.write(cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss,
                        target=target, min_steps=min_steps)


def read_prefix(
    cell: "MemoryCell", memory: torch.Tensor, n_tokens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the READ places before the query: (B, P, d) input embeddings and (B,) real rows per sample.

    ``memory`` (B, P, d) as written; ``n_tokens`` (B,) the context lengths, needed by full_context only."""
    method = of(cell)
    return method.memory_input(cell, memory), method.prefix_lengths(memory, n_tokens)


def max_context_tokens(num_memory: int, max_positions: int, config_limit: int, method: Method) -> int:
    """Longest context a WRITE accepts: the config's limit, and the WRITE's input ([M; C], [M; C; M] for RMT)
    must fit the backbone's positions."""
    return min(config_limit, max_positions - method.write_overhead(num_memory))


def full_rows(memory: torch.Tensor) -> torch.Tensor:
    """(B,) every row of every memory."""
    return torch.full((memory.shape[0],), memory.shape[1], dtype=torch.long, device=memory.device)


# ---------------------------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class GradMem:
    """The paper's method: K SGD steps on the reconstruction loss from the learned M0 (``gradmem.write``)."""

    name: str = "gradmem"
    has_memory: bool = True
    second_order: bool = True
    projection_bias: bool = False
    adaptive: bool = True

    def write(self, cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss,
              target=None, min_steps=0):
        return gradient_steps(cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss,
                              target, min_steps)

    def memory_input(self, cell, memory):
        return cell.project(memory)  # (B, m, d): GradMem projects M before every use

    def prefix_lengths(self, memory, n_tokens):
        return full_rows(memory)

    def memory_slots(self, num_memory, max_context_tokens):
        return num_memory

    def write_overhead(self, num_memory):
        return num_memory  # [M; C]


@dataclass(frozen=True)
class RMT:
    """Forward-only writes: K passes of ``[M_k; C; M_k]``, M_{k+1} = last hidden states at the trailing m slots.

    Each pass re-reads the whole context with the current memory as both prefix and trailing slots. Training
    keeps the graph through every pass (backprop through the forward writes); ``inference`` runs without one."""

    name: str = "rmt"
    has_memory: bool = True
    second_order: bool = False
    projection_bias: bool = True  # the authors' recipe: default nn.Linear init with bias, applied when writing

    def write(self, cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss):
        batch = ctx_ids.shape[0]
        lengths = ctx_mask.sum(dim=1)  # (B,) contexts are right-padded
        build_graph = mode != "inference" and torch.is_grad_enabled()
        memory = cell.memory.unsqueeze(0).expand(batch, -1, -1)  # (B, m, d) M0 for every sample
        if not build_graph:
            memory = memory.detach()
        trajectory = [memory]
        with torch.set_grad_enabled(build_graph):
            for _ in range(steps):
                memory = rmt_pass(cell, memory, ctx_ids, lengths)
                trajectory.append(memory)

        losses = ctx_ids.new_zeros((batch, 0), dtype=torch.float32)
        accuracy = None
        if final_stats:
            with torch.no_grad():  # diagnostics: the READ sees M as written, so the write loss does too
                stats = [cell.write_loss(mem.detach(), ctx_ids, ctx_mask) for mem in trajectory]
            losses = torch.stack([loss for loss, _ in stats], dim=1)  # (B, K + 1)
            accuracy = stats[-1][1]  # (B,)
        return WriteOutput(memory=memory, losses=losses, accuracy=accuracy, last_step_loss=None)

    def memory_input(self, cell, memory):
        return memory  # the projection belongs to the write (already applied)

    def prefix_lengths(self, memory, n_tokens):
        return full_rows(memory)

    def memory_slots(self, num_memory, max_context_tokens):
        return num_memory

    def write_overhead(self, num_memory):
        return 2 * num_memory  # [M; C; M]


def rmt_pass(cell: "MemoryCell", memory: torch.Tensor, ctx_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One forward write: (B, m, d) memory, (B, L) right-padded context, (B,) lengths -> (B, m, d) new memory.

    Each sample is packed as ``[M; C_i; M]`` and only then right-padded, so the trailing slots follow the
    sample's own last token (never pads) and sit at the positions they would have if written alone."""
    m, d = memory.shape[1], memory.shape[2]
    tokens = cell.lm.get_input_embeddings()(ctx_ids)  # (B, L, d)
    slots = memory.to(tokens.dtype)  # (B, m, d)
    if bool((lengths == ctx_ids.shape[1]).all()):  # no padding: one concatenation
        embeds = torch.cat([slots, tokens, slots], dim=1)  # (B, 2m + L, d)
    else:
        seqs = [torch.cat([slots[i], tokens[i, :n], slots[i]]) for i, n in enumerate(lengths.tolist())]  # (2m + L_i, d)
        embeds = pad_sequence(seqs, batch_first=True)  # (B, 2m + max L_i, d)
    hidden = cell.last_hidden(embeds)  # (B, 2m + max L_i, d)
    index = (m + lengths)[:, None] + torch.arange(m, device=lengths.device)  # (B, m): the trailing slots
    return cell.project(hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, d)))  # (B, m, d)


@dataclass(frozen=True)
class FullContext:
    """Upper bound: the memory is the context's input embeddings (B, L, d), pads zeroed; lengths say how many
    rows are real. With a graph when training, so the READ's gradient reaches the embeddings through it."""

    name: str = "full_context"
    has_memory: bool = False
    second_order: bool = False
    projection_bias: bool = False

    def write(self, cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss):
        batch = ctx_ids.shape[0]
        build_graph = mode != "inference" and torch.is_grad_enabled()
        with torch.set_grad_enabled(build_graph):
            tokens = cell.lm.get_input_embeddings()(ctx_ids)  # (B, L, d)
            memory = tokens * ctx_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, d)
        return WriteOutput(
            memory=memory, losses=ctx_ids.new_zeros((batch, 0), dtype=torch.float32),
            accuracy=torch.ones(batch, device=ctx_ids.device), last_step_loss=None, lengths=ctx_mask.sum(dim=1),
        )

    def memory_input(self, cell, memory):
        return memory  # token embeddings already

    def prefix_lengths(self, memory, n_tokens):
        if n_tokens is None:
            raise ValueError("a full-context memory needs its context lengths (n_tokens) to be read")
        lengths = n_tokens.to(device=memory.device, dtype=torch.long)
        if bool((lengths > memory.shape[1]).any()):
            raise ValueError(f"context lengths {lengths.max().item()} exceed the memory's {memory.shape[1]} rows")
        return lengths

    def memory_slots(self, num_memory, max_context_tokens):
        return max_context_tokens

    def write_overhead(self, num_memory):
        return 0  # the READ's length is checked per question instead


@dataclass(frozen=True)
class NoContext:
    """Lower bound: an empty memory (B, 0, d). The context is not even embedded."""

    name: str = "no_context"
    has_memory: bool = False
    second_order: bool = False
    projection_bias: bool = False

    def write(self, cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss):
        batch = ctx_ids.shape[0]
        memory = cell.memory.new_zeros((batch, 0, cell.d_model)).detach()  # (B, 0, d)
        return WriteOutput(
            memory=memory, losses=ctx_ids.new_zeros((batch, 0), dtype=torch.float32),
            accuracy=torch.zeros(batch, device=ctx_ids.device), last_step_loss=None,
            lengths=torch.zeros(batch, dtype=torch.long, device=ctx_ids.device),
        )

    def memory_input(self, cell, memory):
        return memory

    def prefix_lengths(self, memory, n_tokens):
        return full_rows(memory)  # zero rows

    def memory_slots(self, num_memory, max_context_tokens):
        return 0

    def write_overhead(self, num_memory):
        return 0


for _method in (GradMem(), RMT(), FullContext(), NoContext()):
    register(_method)
