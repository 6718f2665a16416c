"""The memory cell: any Hugging Face causal LM plus a learned initial memory, a write head and a memory projection.

Like the RMT ``MemoryCell``, it only adds memory in front of the token embeddings and measures what a prefix
reconstructs; it knows nothing of strings, batching, decoding or validation. Which prefix a memory becomes and
how a memory is written is the method's business (``gradmem.methods``); turning strings and token ids into
batches is the reader's (``gradmem.reader``). Checkpoints (``save_pretrained`` / ``from_pretrained``) and the
fingerprint live here, because they are the cell's weights.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from gradmem import checkpoint, methods
from gradmem.config import MemoryConfig


def max_positions(config: PretrainedConfig) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 30)


class MemoryCell(nn.Module):
    """A causal LM with a memory prefix: the tensor-level pieces every method and the READ use.

    Parameters trained in the outer loop: the backbone, ``memory`` (M0, (m, d)), ``write_head`` (when on) and
    ``mem_proj`` (when on). ``from_pretrained`` returns a frozen cell in eval mode, ready to write and answer;
    training code builds or loads cells with ``trainable=True``. ``gradmem.reader.Reader`` is this cell with the
    public string API on top; the state dict (and so every checkpoint) is the cell's alone.
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
        if config.mem_proj and methods.get(config.method).projection_bias:
            # the RMT baseline's projection (the authors' recipe): default nn.Linear init with bias, applied to the
            # hidden states a forward write produces, never at READ (gradmem.methods.rmt_pass)
            self.mem_proj = nn.Linear(d, d, bias=True, dtype=dtype)
        elif config.mem_proj:
            self.mem_proj = nn.Linear(d, d, bias=False, dtype=dtype)  # GradMem's preconditioner: identity init
            nn.init.eye_(self.mem_proj.weight)
        self._fingerprint: tuple[tuple[int, ...], str] | None = None
        self._compiled_forward = None  # a compiled function, not a module: it must not enter state_dict
        self._compiled_write_gradient = None  # compile_write_step's function (training); same rule

    # ------------------------------------------------------------------ construction and checkpoints
    @classmethod
    def from_config(
        cls, backbone: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, config: MemoryConfig | None = None,
        attention: str = "sdpa",
    ) -> "MemoryCell":
        """A reader around a freshly initialised backbone (from-scratch training, tests)."""
        lm = AutoModelForCausalLM.from_config(backbone, attn_implementation=attention)
        return cls(lm, tokenizer, config or MemoryConfig())

    @classmethod
    def from_language_model(
        cls, path: str | os.PathLike, config: MemoryConfig | None = None, dtype: str | torch.dtype = "auto",
        attention: str = "sdpa",
    ) -> "MemoryCell":
        """A fresh reader around a plain local Hugging Face causal LM directory (e.g. jobs/prepare_model.py's
        output): the pretrained backbone and its tokenizer, a new M0, write head and memory projection.

        Only local files are read (``local_files_only``); seed torch first for a reproducible M0."""
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention, use_safetensors=True,
                                                   local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if tokenizer.pad_token is None:  # pads only fill masked positions; any id will do
            tokenizer.pad_token = tokenizer.eos_token
        return cls(lm, tokenizer, config or MemoryConfig())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, trainable: bool = False, device: str | torch.device = "cpu") -> "MemoryCell":
        """Load a reader directory written by ``save_pretrained``. Nothing is unpickled.

        The stored fingerprint is checked against the loaded weights, so a corrupted or edited checkpoint
        fails here rather than writing memories no one can trust.
        """
        section = checkpoint.read_section(path)
        # never a directory's own code (config.json's auto_map): transformers would ask on stdin, and a "y" runs it
        lm = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype="auto", attn_implementation="sdpa",
                                                  trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
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

    def freeze(self) -> "MemoryCell":
        """Eval mode and no weight gradients: the state for writing memories and answering."""
        self.eval()
        self.requires_grad_(False)
        return self

    def compile(self, **options) -> "MemoryCell":
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
    def compiled(self) -> bool:
        """Whether ``compile()`` was called: the backbone runs as one compiled graph (see ``inference_steps``)."""
        return self._compiled_forward is not None

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

    # ------------------------------------------------------------------ tensor-level pieces
    def project(self, memory: torch.Tensor) -> torch.Tensor:
        """(B, m, d) -> (B, m, d): the memory projection, when on (where it applies is the method's choice:
        before every use of M for GradMem, on the written hidden states for RMT; see gradmem.methods)."""
        return self.mem_proj(memory) if self.mem_proj is not None else memory

    def hidden(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states of ``[P; ids]``: (B, P, d) prefix embeddings (what the backbone sees for a memory,
        ``Method.memory_input``), (B, L) -> (B, P + L, d). No mask: inputs are right-padded."""
        tokens = self.lm.get_input_embeddings()(ids)  # (B, L, d)
        embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (B, P + L, d)
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

    @property
    def reconstruction_head(self) -> nn.Module:
        """The head of the write loss: the write head when on, else the LM head."""
        return self.write_head if self.write_head is not None else self.lm.get_output_embeddings()

    def write_loss(self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mean reconstruction loss of the context given ``[M; C]`` and its token accuracy, each (B,).

        ``prefix`` (B, m, d) is M as the backbone sees it (``Method.memory_input``: projected for GradMem). The
        last memory slot predicts the first context token, so the final context token is never an input.

        Dense over (B, L) and weighted by the mask, rather than selecting the masked positions as the READ does:
        every context token is a target, so selection would only skip the padding, and fixed shapes are what lets
        ``compile_write_step`` compile the WRITE's gradient step (a boolean selection has a data-dependent size)."""
        m = prefix.shape[1]
        hidden = self.hidden(prefix, ids[:, :-1])[:, m - 1 :]  # (B, L, d): position m-1+t predicts token t
        logits = self.reconstruction_head(hidden)  # (B, L, V)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the loss in at least fp32; never downcast (float64 gradient checks)
        ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # (B, L)
        weights = mask.to(ce.dtype)  # (B, L)
        count = weights.sum(dim=1).clamp(min=1)  # (B,)
        correct = (logits.detach().argmax(-1) == ids).to(ce.dtype)  # (B, L)
        return (ce * weights).sum(dim=1) / count, (correct * weights).sum(dim=1) / count

    # ------------------------------------------------------------------ the WRITE's gradient step, compiled
    @property
    def compiled_write_gradient(self):
        """``compile_write_step``'s function, or None (the WRITE then differentiates with ``torch.autograd``)."""
        return self._compiled_write_gradient

    def functional_write_gradient(
        self, memory: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient of the write loss w.r.t. the memory, and the loss: (B, m, d), (B,), as one function.

        (B, m, d) memory as stored (projected here, as the READ projects it). ``torch.func.grad`` makes the
        gradient an output of the function, differentiable by the outer loss, so ``torch.compile`` can take the
        whole step (``compile_write_step``). Each sample's loss is its own mean, summed over the batch: a sample's
        gradient does not depend on the batch it sits in (as in ``gradmem.write``'s autograd step)."""
        def total(mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss, _ = self.write_loss(self.project(mem), ids, mask)  # (B,)
            return loss.sum(), loss  # the loss keeps its outer graph (the auxiliary write loss uses it)

        return torch.func.grad(total, has_aux=True)(memory)

    def compile_write_step(self, **options) -> "MemoryCell":
        """Compile the WRITE's gradient step (forward, its backward and, in meta-training, the backward of that)
        with ``torch.compile`` for training.

        ``compile()`` cannot serve meta-training: a compiled backbone has no double backward. Compiling the
        whole step, ``torch.func.grad`` included, turns the inner gradient into ordinary operations of one
        graph, whose own backward the compiler builds. It fuses the element-wise work of the forward, backward
        and double backward (norms, rotary, SwiGLU, softmax) that dominates small models on CPU. Costs a compile
        of one to three minutes per input shape (contexts padded to fixed lengths recompile less), so it is for
        training runs, not for a few steps. Training's attention paths (``sdpa_math``, ``eager``) both compile;
        ``sdpa_math`` measured faster (benchmarks.core)."""
        self._compiled_write_gradient = torch.compile(self.functional_write_gradient, **options)
        return self


def per_sample_mean(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean of flat per-token ``values`` (n,) grouped by sample index ``rows`` (n,) -> (B,)."""
    total = torch.zeros(batch, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    count = torch.zeros(batch, dtype=values.dtype, device=values.device).index_add(0, rows, torch.ones_like(values))
    return total / count.clamp(min=1)
