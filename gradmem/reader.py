"""The reader: any Hugging Face causal LM plus a learned initial memory, a write head and a memory projection.

A reader writes a context into m prefix vectors by test-time gradient descent (``gradmem.write``) and answers
queries from those vectors alone (``gradmem.read``). Like the RMT ``MemoryCell``, it only adds memory in front
of the token embeddings; ``gradmem.train`` trains and evaluates it (on Ray: ``pipelines/train.py``). ``config.method``
swaps in a baseline (RMT forward writes, full context, no context) behind the same ``write`` / ``answer``: the choice is
made in ``gradmem.methods`` only.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from gradmem import checkpoint, methods
from gradmem.attention import attention_path
from gradmem.config import MemoryConfig
from gradmem.data import pad, tokenize
from gradmem.memory import Memories, NonFiniteWriteError, WriteStats
from gradmem.read import greedy_generate, per_sample_mean


@dataclass(frozen=True)
class ReaderSpec:
    """What a pipeline must know of a reader without loading its weights (driver processes, validation tasks)."""

    fingerprint: str
    num_memory: int  # m
    d_model: int  # d
    max_context_tokens: int
    write_steps: int  # defaults of the WRITE
    write_lr: float

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ReaderSpec":
        """Read from a reader directory's config.json (the fingerprint stored by ``save_pretrained``)."""
        section = checkpoint.read_section(path)
        memory = MemoryConfig.from_dict(section["memory"])
        backbone = AutoConfig.from_pretrained(path)
        d = backbone.get_text_config().hidden_size
        limit = min(memory.max_context_tokens, max_positions(backbone) - memory.num_memory)
        return cls(section["fingerprint"], memory.num_memory, d, limit, memory.write_steps, memory.write_lr)


def max_positions(config: PretrainedConfig) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 30)

INFERENCE_ATTENTION = "sdpa"  # first-order writes and answers may use PyTorch's fastest kernels


class Reader(nn.Module):
    """A causal LM that reads and writes memory.

    Parameters trained in the outer loop: the backbone, ``memory`` (M0, (m, d)), ``write_head`` (when on) and
    ``mem_proj`` (when on). ``Reader.from_pretrained`` returns a frozen reader in eval mode, ready to write and
    answer; training code builds or loads readers with ``trainable=True``.
    """

    def __init__(self, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MemoryConfig):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config
        d = lm.get_input_embeddings().embedding_dim
        dtype = lm.get_input_embeddings().weight.dtype
        self.memory = nn.Parameter(torch.randn(config.num_memory, d, dtype=dtype) * 0.02)  # M0 (m, d)
        head = lm.get_output_embeddings()
        self.write_head: nn.Module | None = None
        if config.write_head:
            self.write_head = copy.deepcopy(head)  # an untied copy of the LM head, trained in the outer loop
            self.write_head.weight = nn.Parameter(head.weight.detach().clone())
        self.mem_proj: nn.Linear | None = None
        if config.mem_proj and config.method == "rmt":
            # the RMT baseline's projection (the authors' recipe): default nn.Linear init with bias, applied to the
            # hidden states a forward write produces, never at READ (gradmem.methods.rmt_pass)
            self.mem_proj = nn.Linear(d, d, bias=True, dtype=dtype)
        elif config.mem_proj:
            self.mem_proj = nn.Linear(d, d, bias=False, dtype=dtype)  # GradMem's preconditioner: identity init
            nn.init.eye_(self.mem_proj.weight)
        self._fingerprint: tuple[tuple[int, ...], str] | None = None
        self._compiled_forward = None  # a compiled function, not a module: it must not enter state_dict
        self._stop_ids: set[int] | None = None  # see stop_ids

    # ------------------------------------------------------------------ construction and checkpoints
    @classmethod
    def from_config(
        cls, backbone: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, config: MemoryConfig | None = None,
        attention: str = "sdpa",
    ) -> "Reader":
        """A reader around a freshly initialised backbone (from-scratch training, tests)."""
        lm = AutoModelForCausalLM.from_config(backbone, attn_implementation=attention)
        return cls(lm, tokenizer, config or MemoryConfig())

    @classmethod
    def from_language_model(
        cls, path: str | os.PathLike, config: MemoryConfig | None = None, dtype: str | torch.dtype = "auto",
        attention: str = "sdpa",
    ) -> "Reader":
        """A fresh reader around a plain local Hugging Face causal LM directory (e.g. jobs/prepare_model.py's
        output): the pretrained backbone and its tokenizer, a new M0, write head and memory projection.

        Only local files are read (``local_files_only``); seed torch first for a reproducible M0."""
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention, use_safetensors=True,
                                                   local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:  # pads only fill masked positions; any id will do
            tokenizer.pad_token = tokenizer.eos_token
        return cls(lm, tokenizer, config or MemoryConfig())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, trainable: bool = False, device: str | torch.device = "cpu") -> "Reader":
        """Load a reader directory written by ``save_pretrained``. Nothing is unpickled.

        The stored fingerprint is checked against the loaded weights, so a corrupted or edited checkpoint
        fails here rather than writing memories no one can trust.
        """
        section = checkpoint.read_section(path)
        lm = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype="auto", attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path)
        reader = cls(lm, tokenizer, MemoryConfig.from_dict(section["memory"]))
        extra = load_file(str(Path(path) / checkpoint.EXTRA_WEIGHTS))
        missing, unexpected = reader.load_state_dict(extra, strict=False)
        wanted = {k for k in reader.state_dict() if not k.startswith("lm.")}
        if wanted - set(extra) or unexpected:
            raise ValueError(f"{path}: {checkpoint.EXTRA_WEIGHTS} does not match the config "
                             f"(missing {sorted(wanted - set(extra))}, unexpected {sorted(unexpected)})")
        reader.to(device)
        if not trainable:
            reader.freeze()
        stored = section.get("fingerprint")
        if stored and stored != reader.fingerprint:
            raise ValueError(f"{path}: weights do not match the stored fingerprint {stored} (got {reader.fingerprint}); "
                             "the checkpoint is corrupted or was edited")
        return reader

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face-layout reader directory (see ``gradmem.checkpoint``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.config.gradmem = {
            "format_version": checkpoint.FORMAT_VERSION,
            "memory": self.config.to_dict(),
            "fingerprint": self.fingerprint,
        }
        try:
            self.lm.save_pretrained(path, safe_serialization=True)
        finally:
            del self.lm.config.gradmem
        extra = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("lm.")}
        save_file(extra, str(path / checkpoint.EXTRA_WEIGHTS))
        self.tokenizer.save_pretrained(path)

    def freeze(self) -> "Reader":
        """Eval mode and no weight gradients: the state for writing memories and answering."""
        self.eval()
        self.requires_grad_(False)
        return self

    def compile(self, **options) -> "Reader":
        """Compile the backbone with ``torch.compile`` (dynamic shapes) for WRITEs and teacher-forced READs.

        Fuses the element-wise work (norms, rotary, activations) that dominates small models on CPU; measured
        1.4x on inference writes here, after a one-off compile of tens of seconds: worth it for batch jobs,
        not for a handful of writes. Only for frozen readers: compiled graphs have no double backward, so a
        trainable reader refuses. Greedy answers keep the eager model (their KV cache changes shape each step).
        """
        if any(p.requires_grad for p in self.parameters()):
            raise ValueError("compile() is for frozen readers (inference writes); second-order meta-training "
                             "needs a double backward that compiled graphs do not have. Call freeze() first.")
        self._compiled_forward = torch.compile(self.lm.base_model.forward, dynamic=True, **options)
        return self

    @property
    def fingerprint(self) -> str:
        """Hash of weights and config.

        Cached only while the reader is frozen (the serving and writing state). A trainable reader recomputes
        it on every access: optimizers and ZeRO write weights through flat buffers that do not bump the
        parameters' version counters, so no cheap key can tell that they changed."""
        frozen = not any(p.requires_grad for p in self.parameters())
        key = tuple(t._version for t in self.state_dict().values()) if frozen else None
        if key is None or self._fingerprint is None or self._fingerprint[0] != key:
            value = checkpoint.compute_fingerprint(
                self.state_dict(), self.lm.config.to_dict(), self.config.to_dict(), self.tokenizer.get_vocab()
            )
            self._fingerprint = (key, value) if key is not None else None
            return value
        return self._fingerprint[1]

    # ------------------------------------------------------------------ shapes
    @property
    def device(self) -> torch.device:
        return self.memory.device

    @property
    def num_memory(self) -> int:
        return self.memory.shape[0]

    @property
    def d_model(self) -> int:
        return self.memory.shape[1]

    @property
    def max_positions(self) -> int:
        return max_positions(self.lm.config)

    @property
    def max_context_tokens(self) -> int:
        """Longest context a WRITE accepts: the config's limit, and [M; C] ([M; C; M] for RMT) must fit the
        backbone's positions."""
        return min(self.config.max_context_tokens, self.max_positions - methods.write_overhead(self))

    @property
    def spec(self) -> "ReaderSpec":
        return ReaderSpec(self.fingerprint, self.num_memory, self.d_model, self.max_context_tokens,
                          self.config.write_steps, self.config.write_lr)

    # ------------------------------------------------------------------ tensor-level pieces
    def project(self, memory: torch.Tensor) -> torch.Tensor:
        """(B, m, d) -> (B, m, d): the memory projection, when on (where it applies is the method's choice:
        before every use of M for GradMem, on the written hidden states for RMT; see gradmem.methods)."""
        return self.mem_proj(memory) if self.mem_proj is not None else memory

    def hidden(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states of ``[M; ids]``: (B, m, d), (B, L) -> (B, m + L, d). No mask: inputs are right-padded."""
        tokens = self.lm.get_input_embeddings()(ids)  # (B, L, d)
        embeds = torch.cat([methods.memory_input(self, memory).to(tokens.dtype), tokens], dim=1)  # (B, m + L, d)
        return self.last_hidden(embeds)

    def last_hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states (after its final norm): (B, T, d) input embeddings -> (B, T, d)."""
        forward = self._compiled_forward or self.lm.base_model
        return forward(inputs_embeds=embeds, use_cache=False).last_hidden_state

    @staticmethod
    def token_losses(
        hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, head: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy and argmax correctness at the masked positions only (no logits for pads).

        hidden (B, L, d) predicts ids (B, L); returns ce (n,), correct (n,), sample index (n,)."""
        selected = mask.bool()  # (B, L)
        logits = head(hidden[selected])  # (n, V)
        targets = ids[selected]  # (n,)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the loss in at least fp32; never downcast (float64 gradient checks)
        ce = F.cross_entropy(logits, targets, reduction="none")
        correct = logits.detach().argmax(-1) == targets
        rows = selected.nonzero()[:, 0]
        return ce, correct, rows

    def write_loss(self, memory: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mean reconstruction loss of the context given ``[M; C]`` and its token accuracy, each (B,).

        The last memory slot predicts the first context token, so the final context token is never an input."""
        m = memory.shape[1]
        hidden = self.hidden(memory, ids[:, :-1])[:, m - 1 :]  # (B, L, d): position m-1+t predicts token t
        head = self.write_head if self.write_head is not None else self.lm.get_output_embeddings()
        ce, correct, rows = self.token_losses(hidden, ids, mask, head)
        batch = ids.shape[0]
        return per_sample_mean(ce, rows, batch), per_sample_mean(correct.float(), rows, batch)

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
        attention: str = INFERENCE_ATTENTION,
    ) -> Memories:
        """Write each context into its own memory (inference mode: first-order, weights untouched).

        Contexts are grouped by length into batches of ``batch_size`` to pad little; the result keeps the
        input order. Raises ``NonFiniteWriteError`` (carrying every memory) if any write produced NaN/inf.
        The memory's rows and statistics depend on the method (``gradmem.methods``)."""
        return self.write_tokens(self.encode_contexts(contexts), steps, lr, batch_size, attention)

    def check_tokens(self, ids: Sequence[Sequence[int]]) -> None:
        """A clear ValueError for any empty or over-long token list (what ``encode_contexts`` checks on text)."""
        limit = self.max_context_tokens
        for i, seq in enumerate(ids):
            if len(seq) == 0:
                raise ValueError(f"context {i} has no tokens: there is nothing to write")
            if len(seq) > limit:
                raise ValueError(f"context {i} has {len(seq)} tokens, over this reader's maximum of {limit}")

    def write_tokens(
        self, ids: Sequence[Sequence[int]], steps: int | None = None, lr: float | None = None, batch_size: int = 64,
        attention: str = INFERENCE_ATTENTION,
    ) -> Memories:
        """``write`` on token ids already produced by this reader's tokenizer (batch jobs tokenize upstream)."""
        steps = self.config.write_steps if steps is None else int(steps)
        lr = self.config.write_lr if lr is None else float(lr)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.check_tokens(ids)
        n = len(ids)
        tensor = torch.zeros(n, methods.memory_slots(self), self.d_model, dtype=self.memory.dtype)  # (n, P, d)
        losses = torch.zeros(n, steps + 1)
        accuracy = torch.zeros(n)
        pad_id = self.tokenizer.pad_token_id or 0
        with attention_path(self.lm, attention):
            for chunk in length_buckets(ids, batch_size):
                ctx_ids, ctx_mask = pad([list(ids[i]) for i in chunk], pad_id)
                out = methods.write(self, ctx_ids.to(self.device), ctx_mask.to(self.device), steps, lr, mode="inference")
                tensor[chunk, : out.memory.shape[1]] = out.memory.detach().cpu()  # full_context: rows past L stay 0
                if losses.shape[1] != out.losses.shape[1]:  # methods without a loss trajectory record none
                    losses = torch.zeros(n, out.losses.shape[1])
                losses[chunk] = out.losses.float().cpu()
                accuracy[chunk] = out.accuracy.float().cpu()
        n_tokens = torch.tensor([len(s) for s in ids])
        memories = Memories(tensor, WriteStats(losses, accuracy, n_tokens), self.fingerprint, steps, lr)
        bad = (~memories.finite()).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteWriteError(bad, memories)
        return memories

    def reconstruct(self, memories: Memories, ids: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
        """(B,) free-running reconstruction accuracy: decode ``len(ids[i])`` tokens greedily from memory ``i``
        alone with the write head and count the positions that equal the context.

        Stricter than the teacher-forced accuracy in the write statistics (one early mistake derails the
        rest), so it tells whether a memory really holds its context. Costs one decoding step per token."""
        if len(memories) != len(ids):
            raise ValueError(f"need one token list per memory: {len(memories)} memories, {len(ids)} token lists")
        head = self.write_head if self.write_head is not None else self.lm.get_output_embeddings()
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
        attention: str = INFERENCE_ATTENTION,
    ) -> list[str]:
        """Greedy answers to ``questions[i]`` from ``memories[i]`` alone (the context is never seen, except by the
        full-context bound, whose memory is the context)."""
        if isinstance(questions, str) or not isinstance(questions, Sequence):
            raise ValueError("questions must be a list of strings")
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise ValueError(f"question {i} is a {type(q).__name__}, not a string")
        return self.answer_tokens(memories, tokenize(self.tokenizer, questions), max_new_tokens, batch_size, attention)

    def check_questions(self, prefix_rows: Sequence[int], q_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """A clear ValueError for any question that would not fit the backbone's positions after its memory rows."""
        for i, (rows, q) in enumerate(zip(prefix_rows, q_ids)):
            if rows + len(q) + max_new_tokens > self.max_positions:
                raise ValueError(f"question {i} is too long: {len(q)} tokens + {rows} memory + "
                                 f"{max_new_tokens} new tokens exceed {self.max_positions} positions")

    def answer_tokens(
        self, memories: Memories, q_ids: Sequence[Sequence[int]], max_new_tokens: int = 16, batch_size: int = 64,
        attention: str = INFERENCE_ATTENTION,
    ) -> list[str]:
        """``answer`` on question token ids already produced by this reader's tokenizer (the service tokenizes
        once, to check sizes before a request joins a batch)."""
        if memories.fingerprint != self.fingerprint:
            raise ValueError(f"these memories were written by reader {memories.fingerprint}, not by this reader "
                             f"({self.fingerprint}); rewrite them with this reader")
        if len(q_ids) != len(memories):
            raise ValueError(f"need one question per memory: got {len(memories)} memories and {len(q_ids)} questions")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        bad = (~memories.finite()).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"memories at indices {bad} hold NaN/inf and cannot be read")
        self.check_questions(methods.prefix_lengths(self, memories.tensor, memories.stats.n_tokens).tolist(), q_ids,
                             max_new_tokens)
        answers: list[str] = []
        with attention_path(self.lm, attention):
            for start in range(0, len(q_ids), batch_size):
                memory = memories.tensor[start : start + batch_size].to(self.device, self.memory.dtype)  # (b, P, d)
                prefix, n_rows = methods.read_prefix(self, memory, memories.stats.n_tokens[start : start + batch_size])
                for ids in greedy_generate(self, prefix, n_rows, q_ids[start : start + batch_size], max_new_tokens,
                                           self.stop_ids):
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
