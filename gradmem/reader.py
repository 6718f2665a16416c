"""The reader: the public API around a memory cell. Strings and token ids in, memories and answers out.

``Reader`` is a ``gradmem.cell.MemoryCell`` (same weights, same checkpoints) plus what turns inputs into batches:
validation of texts and token lists, length-bucketed batching, the calls to the method's WRITE
(``gradmem.methods``) and to the READ (``gradmem.read``), greedy decoding back to strings. Data flows one way:
reader -> methods -> write / read -> cell; nothing below calls back up. ``config.method`` swaps in a baseline
(RMT forward writes, full context, no context) behind the same ``write`` / ``answer``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import AutoConfig

from gradmem import checkpoint, methods
from gradmem.attention import attention_path, write_attention
from gradmem.cell import MemoryCell, max_positions
from gradmem.config import MemoryConfig
from gradmem.data import pad, tokenize
from gradmem.memory import Memories, NonFiniteWriteError, WriteSetting, WriteStats, check_precision
from gradmem.read import chunk_totals, compose, greedy_generate

INFERENCE_ATTENTION = "sdpa"  # first-order answers may use PyTorch's fastest kernels (writes: write_attention)


@dataclass(frozen=True)
class ReaderSpec:
    """What a pipeline must know of a reader without loading its weights (driver processes, validation tasks)."""

    fingerprint: str
    num_memory: int  # m
    d_model: int  # d
    max_context_tokens: int
    write_steps: int  # defaults of the WRITE
    write_lr: float
    target_accuracy: float | None = None  # an adaptive WRITE's default target (None: fixed K)
    min_write_steps: int = 0  # and the steps every context takes first

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ReaderSpec":
        """Read from a reader directory's config.json (the fingerprint stored by ``save_pretrained``)."""
        section = checkpoint.read_section(path)
        memory = MemoryConfig.from_dict(section["memory"])
        backbone = AutoConfig.from_pretrained(path, trust_remote_code=False)
        d = backbone.get_text_config().hidden_size
        limit = methods.max_context_tokens(memory.num_memory, max_positions(backbone), memory.max_context_tokens,
                                           methods.get(memory.method))
        return cls(section["fingerprint"], memory.num_memory, d, limit, memory.write_steps, memory.write_lr,
                   memory.target_accuracy, memory.min_write_steps)


class Reader(MemoryCell):
    """A memory cell with the public API: ``write`` contexts into memories, ``answer`` questions from them.

    ``Reader.from_pretrained(path)`` returns a frozen reader in eval mode; ``reader.fingerprint`` names it and
    every memory it writes. Inputs are checked here, once: texts and token lists on WRITE; the memories'
    reader, finiteness and the questions' length on ``answer`` / ``answer_tokens``. ``generate_answers`` is the
    unchecked READ for callers that checked already (the service)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stop_ids: set[int] | None = None  # see stop_ids

    @property
    def method(self) -> methods.Method:
        return methods.of(self)

    @property
    def max_context_tokens(self) -> int:
        """Longest context a WRITE accepts: the config's limit, and [M; C] ([M; C; M] for RMT) must fit the
        backbone's positions."""
        return methods.max_context_tokens(self.num_memory, self.max_positions, self.config.max_context_tokens,
                                          self.method)

    @property
    def spec(self) -> ReaderSpec:
        return ReaderSpec(self.fingerprint, self.num_memory, self.d_model, self.max_context_tokens,
                          self.config.write_steps, self.config.write_lr, self.config.target_accuracy,
                          self.config.min_write_steps)

    # ------------------------------------------------------------------ public string API
    def encode_contexts(self, contexts: Sequence[str]) -> list[list[int]]:
        """Token ids of each context; a clear ValueError names any empty, non-text or over-long item."""
        if isinstance(contexts, str) or not isinstance(contexts, Sequence):
            raise ValueError("contexts must be a list of strings")
        for i, text in enumerate(contexts):
            if not isinstance(text, str):
                raise ValueError(f"context {i} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise ValueError(f"context {i} is empty: there is nothing to write")
        ids = tokenize(self.tokenizer, contexts)
        self.check_tokens(ids)
        return ids

    def write(
        self, contexts: Sequence[str], steps: int | None = None, lr: float | None = None, batch_size: int = 64,
        attention: str | None = None, target: float | None = None, min_steps: int | None = None,
        precision: str = "float32",
    ) -> Memories:
        """Write each context into its own memory (inference mode: first-order, weights untouched).

        Contexts are grouped by length into batches of ``batch_size`` to pad little; the result keeps the
        input order. Raises ``NonFiniteWriteError`` (carrying every memory) if any write produced NaN/inf.
        The memory's rows and statistics depend on the method (``gradmem.methods``). ``target``: write each
        context for ``min_steps``, then until its reconstruction accuracy reaches it, ``steps`` at most (None: the
        reader's ``target_accuracy`` and ``min_write_steps``, by default no target: always ``steps``);
        ``Memories.steps_used`` says how many it took. ``precision``: the WRITE's arithmetic
        (``gradmem.memory.WRITE_PRECISIONS``: bfloat16 runs it under autocast; part of the write setting).
        ``attention``: a path of ``gradmem.attention.ATTENTION_PATHS``; None takes the fastest measured for the
        device and precision (``write_attention``)."""
        setting = self.write_setting(steps, lr, target, min_steps, precision)
        return self._write_checked(self.encode_contexts(contexts), setting, batch_size, attention)

    def write_setting(self, steps: int | None = None, lr: float | None = None, target: float | None = None,
                      min_steps: int | None = None, precision: str = "float32") -> WriteSetting:
        """The setting a write with these arguments uses (None: this reader's own, ``MemoryConfig``), checked."""
        return WriteSetting.resolve(self.config, steps, lr, target, min_steps, precision)

    def check_tokens(self, ids: Sequence[Sequence[int]]) -> None:
        """A clear ValueError for any empty or over-long token list (what ``encode_contexts`` checks on text)."""
        limit = self.max_context_tokens
        for i, seq in enumerate(ids):
            if len(seq) == 0:
                raise ValueError(f"context {i} has no tokens: there is nothing to write")
            if len(seq) > limit:
                raise ValueError(f"context {i} has {len(seq)} tokens, over this reader's maximum of {limit}")

    def write_tokens(
        self, ids: Sequence[Sequence[int]], setting: WriteSetting | None = None, batch_size: int = 64,
        attention: str | None = None,
    ) -> Memories:
        """``write`` on token ids already produced by this reader's tokenizer, with a setting already resolved
        (batch jobs and the service tokenize, resolve the setting and content-address upstream; None: this
        reader's own, ``write_setting()``)."""
        if setting is not None and not isinstance(setting, WriteSetting):
            raise TypeError(f"setting must be a WriteSetting (reader.write_setting(steps=..., ...)), got "
                            f"{type(setting).__name__}")
        self.check_tokens(ids)
        return self._write_checked(ids, setting or self.write_setting(), batch_size, attention)

    def _write_checked(
        self, ids: Sequence[Sequence[int]], setting: WriteSetting, batch_size: int, attention: str | None,
    ) -> Memories:
        """Length-bucketed inference WRITEs of token lists already checked by ``check_tokens``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        steps, lr, target, min_steps, precision = (setting.steps, setting.lr, setting.target, setting.min_steps,
                                                   check_precision(setting.precision))  # the rest: methods.write
        attention = attention or write_attention(self.device.type, precision)
        n = len(ids)
        slots = self.method.memory_slots(self.num_memory, self.max_context_tokens)
        tensor = torch.zeros(n, slots, self.d_model, dtype=self.memory.dtype)  # (n, P, d)
        losses = torch.zeros(n, steps + 1)
        accuracy = torch.zeros(n)
        steps_used = torch.full((n,), steps, dtype=torch.long)
        pad_id = self.tokenizer.pad_token_id or 0
        arithmetic = (torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bfloat16"
                      else contextlib.nullcontext())  # float32 leaves a caller's own autocast as it is
        # A copy to the host waits for the device, so batch b is copied after batch b + 1 is queued: the device
        # never idles while the host pads and launches, and at most two batches' outputs are held there.
        pending = []  # [(chunk, its WriteOutput on the device)]
        with attention_path(self.lm, attention), arithmetic:
            for chunk in length_buckets(ids, batch_size):
                ctx_ids, ctx_mask = pad([list(ids[i]) for i in chunk], pad_id)
                pending.append((chunk, methods.write(self, ctx_ids.to(self.device), ctx_mask.to(self.device), steps,
                                                     lr, mode="inference", target=target, min_steps=min_steps)))
                if len(pending) == 2:
                    losses = self._store_write(*pending.pop(0), tensor, losses, accuracy, steps_used)
        for done in pending:
            losses = self._store_write(*done, tensor, losses, accuracy, steps_used)
        n_tokens = torch.tensor([len(s) for s in ids])
        stats = WriteStats(losses, accuracy, n_tokens, steps_used if target is not None else None)
        memories = Memories(tensor, stats, self.fingerprint, setting)
        bad = (~memories.finite()).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteWriteError(bad, memories)
        return memories

    @staticmethod
    def _store_write(chunk: list[int], out, tensor: torch.Tensor, losses: torch.Tensor, accuracy: torch.Tensor,
                     steps_used: torch.Tensor) -> torch.Tensor:
        """One batch's WriteOutput copied into the host tensors at its inputs' places; ``losses`` returned (a
        method without a loss trajectory records none: it is replaced by one of that method's width)."""
        tensor[chunk, : out.memory.shape[1]] = out.memory.detach().cpu()  # full_context: rows past L stay 0
        if losses.shape[1] != out.losses.shape[1]:
            losses = torch.zeros(losses.shape[0], out.losses.shape[1])
        losses[chunk] = out.losses.float().cpu()
        accuracy[chunk] = out.accuracy.float().cpu()
        if out.steps_used is not None:
            steps_used[chunk] = out.steps_used.cpu()
        return losses

    def reconstruct(self, memories: Memories, ids: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
        """(B,) free-running reconstruction accuracy: decode ``len(ids[i])`` tokens greedily from memory ``i``
        alone with the write head and count the positions that equal the context.

        Stricter than the teacher-forced accuracy in the write statistics (one early mistake derails the
        rest), so it tells whether a memory really holds its context. Costs one decoding step per token."""
        if len(memories) != len(ids):
            raise ValueError(f"need one token list per memory: {len(memories)} memories, {len(ids)} token lists")
        head = self.reconstruction_head
        accuracy = torch.zeros(len(ids))
        with attention_path(self.lm, INFERENCE_ATTENTION):
            for chunk in length_buckets(ids, batch_size):
                memory = memories.tensor[chunk].to(self.device, self.memory.dtype)  # (b, P, d)
                prefix, n_rows = methods.read_prefix(self, memory, memories.stats.n_tokens[chunk])
                longest = max(len(ids[i]) for i in chunk)
                outs = greedy_generate(self, prefix, n_rows, [[] for _ in chunk], longest, stop_ids=set(), head=head)
                for i, out in zip(chunk, outs):
                    target = list(ids[i])
                    accuracy[i] = sum(a == b for a, b in zip(out, target)) / len(target)
        return accuracy

    def answer(
        self, memories: Memories, questions: Sequence[str], max_new_tokens: int = 16, batch_size: int = 64,
        attention: str = INFERENCE_ATTENTION, chunks: Sequence[int] | None = None,
    ) -> list[str]:
        """Greedy answers to ``questions[i]`` from memories alone (the context is never seen, except by the
        full-context bound, whose memory is the context).

        Without ``chunks`` question i is read from ``memories[i]``. With ``chunks`` (one count per question)
        question i is read from its document's ``chunks[i]`` memories composed in order, ``[M_1; ...; M_c; Q]``
        (``gradmem.read.compose``): ``memories`` holds every document's chunk memories, document after document."""
        if isinstance(questions, str) or not isinstance(questions, Sequence):
            raise ValueError("questions must be a list of strings")
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise ValueError(f"question {i} is a {type(q).__name__}, not a string")
        return self.answer_tokens(memories, tokenize(self.tokenizer, questions), max_new_tokens, batch_size, attention,
                                  chunks)

    def check_questions(self, prefix_rows: Sequence[int], q_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """A clear ValueError for any question that would not fit the backbone's positions after its memory rows
        (a document's rows: all its memories')."""
        for i, (rows, q) in enumerate(zip(prefix_rows, q_ids)):
            if rows + len(q) + max_new_tokens > self.max_positions:
                raise ValueError(f"question {i} is too long: {len(q)} tokens + {rows} memory + "
                                 f"{max_new_tokens} new tokens exceed {self.max_positions} positions")

    def answer_tokens(
        self, memories: Memories, q_ids: Sequence[Sequence[int]], max_new_tokens: int = 16, batch_size: int = 64,
        attention: str = INFERENCE_ATTENTION, chunks: Sequence[int] | None = None,
    ) -> list[str]:
        """``answer`` on question token ids already produced by this reader's tokenizer (the service tokenizes
        once, to check sizes before a request joins a batch)."""
        if memories.fingerprint != self.fingerprint:
            raise ValueError(f"these memories were written by reader {memories.fingerprint}, not by this reader "
                             f"({self.fingerprint}); rewrite them with this reader")
        counts = chunk_counts(chunks, len(q_ids))
        if int(counts.sum()) != len(memories):
            raise ValueError(f"need one question per memory: got {len(memories)} memories and {len(q_ids)} questions"
                             if chunks is None else f"the chunk counts add up to {int(counts.sum())} memories, but "
                             f"{len(memories)} are given for {len(q_ids)} questions")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        bad = (~memories.finite()).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"memories at indices {bad} hold NaN/inf and cannot be read")
        rows = self.prefix_rows(memories.tensor, memories.stats.n_tokens)  # (N,)
        self.check_questions(chunk_totals(rows, counts).tolist(), q_ids, max_new_tokens)
        return self.generate_answers(memories.tensor, rows, q_ids, max_new_tokens, batch_size, attention, counts)

    def prefix_rows(self, tensor: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """(B,) rows of each memory (B, P, d) a READ sees, from the context lengths it was written from (B,);
        a ValueError when they do not fit the memory (full_context)."""
        return self.method.prefix_lengths(tensor, n_tokens)

    def generate_answers(
        self, tensor: torch.Tensor, rows: torch.Tensor, q_ids: Sequence[Sequence[int]], max_new_tokens: int,
        batch_size: int = 64, attention: str = INFERENCE_ATTENTION, chunks: torch.Tensor | Sequence[int] | None = None,
    ) -> list[str]:
        """Greedy answers to ``q_ids[i]`` from its document's memories in ``tensor`` (N, P, d), each with its first
        ``rows`` (N,) rows (``prefix_rows``). ``chunks`` (B,) says how many consecutive memories each question's
        document has (mixed counts batch together); None: one each, ``tensor[i]`` for question i. Unchecked: the
        caller has checked the memories' reader and finiteness and the questions' length (``answer_tokens`` does;
        the service does when a request arrives). ``batch_size`` counts questions."""
        counts = chunk_counts(chunks, len(q_ids))
        ends = counts.cumsum(0).tolist()  # memory index after each document's last
        answers: list[str] = []
        with attention_path(self.lm, attention):
            for start in range(0, len(q_ids), batch_size):
                stop = min(start + batch_size, len(q_ids))
                first, last = (ends[start - 1] if start else 0), ends[stop - 1]  # this batch's memories
                memory = tensor[first:last].to(self.device, self.memory.dtype)  # (n, P, d)
                prefix, n_rows = compose(self.method.memory_input(self, memory), rows[first:last].to(self.device),
                                         counts[start:stop].to(self.device))  # (b, R, d), (b,)
                for ids in greedy_generate(self, prefix, n_rows, q_ids[start:stop], max_new_tokens, self.stop_ids):
                    answers.append(self._decode_answer(ids))
        return answers

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end a greedy answer: EOS and every single-token ``answer_stop`` string (computed once)."""
        if self._stop_ids is None:
            stop = {self.tokenizer.eos_token_id} - {None}
            for text in self.config.answer_stop:
                ids = tokenize(self.tokenizer, [text])[0]
                if len(ids) == 1:
                    stop.add(ids[0])
            self._stop_ids = stop
        return self._stop_ids

    def _decode_answer(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in self.config.answer_stop:
            text = text.split(stop, 1)[0]
        return text


def length_buckets(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length), so a batch pads little."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def chunk_counts(chunks: torch.Tensor | Sequence[int] | None, documents: int) -> torch.Tensor:
    """(B,) memories per document as a tensor: one each when ``chunks`` is None; a ValueError unless there is one
    count per document."""
    if chunks is None:
        return torch.ones(documents, dtype=torch.long)
    counts = torch.as_tensor(chunks, dtype=torch.long).cpu().reshape(-1)
    if counts.shape[0] != documents:
        raise ValueError(f"need one chunk count per question: got {counts.shape[0]} counts for {documents} questions")
    return counts
