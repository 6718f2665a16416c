"""Meta-training: the outer loop that teaches a reader to write and read memories.

``meta_step`` is the unit every trainer calls (this single-process ``Trainer``, and the Ray Train + DeepSpeed
loop in ``pipelines/train.py``): WRITE (second order by default), READ, outer loss = mean READ loss + ``aux_write_loss`` x the last
inner step's write loss. It returns the loss with its graph; the caller owns backward and the optimizer.
The reader's ``config.method`` (GradMem or a baseline, see ``gradmem.methods``) decides what WRITE and READ do;
nothing here branches on it.

``Trainer`` is the single-process assembly of the training loop the Ray Train workers run as well
(``gradmem.loop``: validate and fail fast, set up, resume, train, checkpoint, export). Precision: weights train
in ``model.dtype``; ``optim.autocast: bfloat16`` runs the meta-step's matrix products in bf16 over fp32 weights (mixed precision, as the paper's bf16
runs: pure bf16 weights lose AdamW updates of lr 1e-4 to rounding).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from transformers import GPT2Config, LlamaConfig

from pydantic import Field, model_validator

from gradmem import checkpoint, config, methods
from gradmem.atomic import exclusive, write_atomic
from gradmem.attention import attention_path, check_attention
from gradmem.config import MemoryConfig, declared
from gradmem.data import Batch, check_chunks
from gradmem.read import read_teacher_forced
from gradmem.reader import Reader
from gradmem.tasks import babi, squad
from gradmem.tasks.base import Task
from gradmem.tasks.kv import KVTask, kv_tokenizer
from gradmem.tasks.words import word_tokenizer

logger = logging.getLogger(__name__)

TASKS = ("kv", "file", "babi", "squad")
RECIPE_AUX_WRITE_LOSS = {"kv": 0.5, "file": 0.5}  # the authors' key-value scripts; every other task: 0
# Llama-3.2-1B's RoPE frequency scaling, which the authors' key-value backbone inherits.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------- configs
# Declared with gradmem.config.declared: frozen, validated on construction, unknown keys refused; change one with
# gradmem.config.override (which validates the result), load one with TrainConfig.from_yaml / from_dict.
@declared
class ModelConfig:
    """The backbone: a from-scratch Llama or GPT-2 sized here, or a local Hugging Face directory (``pretrained``).

    ``pretrained`` is either a reader directory (training continues from it, memory settings included) or a plain
    causal LM directory such as jobs/prepare_model.py writes (wrapped into a fresh reader with ``memory``; the
    size fields here are then ignored)."""

    arch: Literal["llama", "gpt2"] = "llama"  # ignored when pretrained is set
    pretrained: str | None = None  # a reader directory, or a plain Hugging Face causal LM directory
    dtype: Literal[DTYPES] = "float32"  # weights (bf16 backbones train in bf16 directly)
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=1)
    max_positions: int = Field(1024, ge=2)
    # The authors' key-value backbone inherits Llama-3.2-1B's config ("Recipe details" of the method notes): tied
    # input/output embeddings, RoPE theta 5e5 with llama3 frequency scaling, RMSNorm eps 1e-5. These defaults are
    # theirs; a config that changes one names the deviation in its header.
    tie_embeddings: bool = True  # llama and gpt2: the LM head shares the input embedding matrix
    rope_theta: float = Field(500000.0, gt=0)  # llama only
    rope_scaling: Literal["llama3"] | None = "llama3"  # llama only: Llama-3.2-1B's factor 32, low 1, high 4, original 8192
    norm_eps: float = Field(1e-5, gt=0)  # RMSNorm (llama) / LayerNorm (gpt2) epsilon
    seed: int = 0  # weight initialisation
    # A reader directory whose weights start this run (curriculum: N pairs from a smaller N's reader, as the authors
    # reach large N). Unlike ``pretrained``, this config's memory settings (K, alpha) apply; the structure (backbone,
    # method, m, heads, projection) must match, or loading fails.
    warm_start: str | None = None

    @model_validator(mode="after")
    def _one_start(self) -> "ModelConfig":
        if self.warm_start and self.pretrained:
            raise ValueError("model.warm_start and model.pretrained exclude each other: pretrained continues a reader "
                             "with its own settings, warm_start copies weights into this config's reader")
        return self


@declared
class TaskConfig:
    """``kv``: key-value examples generated on the fly. ``file``: examples with ``context``, ``query`` and
    ``target`` fields read from jsonl or Parquet (local or s3://) by Ray Data (distributed training only).
    ``babi``: bAbI stories (gradmem/tasks/babi.py). ``squad``: SQuAD v1.1, dev set split by article
    (gradmem/tasks/squad.py). For babi and squad, training batches are drawn from the train split and evaluation
    walks the validation split; a reader trained from scratch gets a word-level tokenizer built from the train
    split (gradmem/tasks/words.py)."""

    name: Literal[TASKS] = "kv"
    pairs: int = Field(8, ge=1)  # kv: pairs per context
    path: str | None = None  # file: a file, a directory or a glob of .jsonl / .parquet; babi: the
    # tasks_1-20_v1-2 directory; squad: dev-v1.1.json (babi, squad: None = under $GRADMEM_DATA)
    tasks: list[str] = Field(default_factory=lambda: ["qa1"])  # babi: qa1 .. qa20 (pooled)
    babi_set: Literal[babi.SETS] = "en-10k"  # en: 1k train questions per task; en-10k: 10k (the paper's; no qa3 here)
    variant: Literal[squad.VARIANTS] = "c_qa"  # squad
    validation_fraction: float = Field(0.1, ge=0, lt=1)  # babi: of the train file's stories; squad: of the articles
    test_fraction: float = Field(0.1, ge=0, lt=1)  # squad: of the articles (babi's test split is the released test file)
    split_seed: int = 0  # babi, squad: the permutation that carves the splits
    answer_eos: bool = True  # babi, squad: append EOS to targets (trained, not scored) so answers stop
    vocab_min_count: int = Field(1, ge=1)  # babi, squad, from scratch: words seen fewer times in train become <unk>
    vocab_max_size: int | None = Field(None, ge=1)  # babi, squad, from scratch: keep the most frequent words only
    # [lo, hi]: a document of c chunks, c drawn uniformly from [lo, hi] per example, each chunk written into its own
    # memory by the same WRITE and the READ over all of them composed (gradmem.read.compose). kv: c contexts of
    # ``pairs`` pairs with distinct keys; babi: the story split into c runs of statements; squad (c_qa): the paragraph
    # into c runs of sentences. Evaluation cycles c over the range. [1, 1]: one context, one memory.
    chunks: list[int] = Field(default_factory=lambda: [1, 1])

    @model_validator(mode="after")
    def _consistent(self) -> "TaskConfig":
        check_chunks(self.chunks)
        if self.chunks != [1, 1] and (self.name == "file" or (self.name == "squad" and self.variant != "c_qa")):
            raise ValueError(f"task.chunks {self.chunks}: multi-chunk documents exist for kv, babi and squad c_qa "
                             f"only, not for {self.name}" + (f" {self.variant}" if self.name == "squad" else ""))
        if self.name == "file" and not self.path:
            raise ValueError("task file needs task.path (jsonl or Parquet with context, query, target)")
        unknown = [name for name in self.tasks if name not in babi.TASK_NAMES]
        if self.name == "babi" and (not self.tasks or unknown):
            raise ValueError(f"task.tasks must name bAbI tasks qa1 .. qa20, got {self.tasks}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("task.validation_fraction + task.test_fraction must leave training data (< 1)")
        return self


@declared
class OptimConfig:
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, ge=0)  # 0: weights never move (a control run)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(1000, ge=0)
    max_steps: int = Field(10000, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    write_mode: Literal["second_order", "first_order"] = "second_order"
    second_order_steps: int | None = Field(None, ge=0)  # second order through the last L inner steps only
    # Weight of the last inner step's write loss in the outer loss. None: the authors' recipe for the task, 0.5 for
    # key-value retrieval (kv, file) and 0 for bAbI and SQuAD (their natural-language scripts train on the READ loss
    # alone); resolved when the TrainConfig is built, so saved configs show the value used.
    aux_write_loss: float | None = Field(None, ge=0)
    attention: str = "sdpa_math"  # must support double backward for second-order training
    # bfloat16: mixed precision for the meta-step (fp32 weights); None: model.dtype throughout (float16 would need
    # loss scaling, so it is not offered)
    autocast: Literal["bfloat16"] | None = None
    # torch.compile the WRITE's gradient step (MemoryCell.compile_write_step): a one-off compile of minutes per
    # context length, then faster meta-steps (docs/results/benchmark_core.txt); for long runs, not smoke tests
    compile_write: bool = False
    seed: int = 0  # data stream


@declared
class RunConfig:
    log_every: int = Field(20, ge=1)
    eval_every: int = Field(500, ge=0)  # 0: no evaluation during training
    eval_samples: int = Field(512, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    save_every: int = Field(1000, ge=0)  # 0: a checkpoint at the end only
    keep_checkpoints: int = Field(2, ge=1)
    # Model selection and stopping (the authors keep the best checkpoint by validation and stop early). They act on
    # the validation evaluations every ``eval_every`` steps, never on test data.
    select_best: bool = True  # export the best evaluated reader (validation EM, ties by token accuracy), not the last
    patience: int | None = Field(None, ge=1)  # stop after this many evaluations without a new best (None: max_steps)
    stop_at_em: float | None = Field(1.0, ge=0, le=1)  # stop once validation EM reaches this (the authors: 1.0)
    max_seconds: float | None = Field(None, gt=0)  # a stated wall-time cap on training per fit() call (a resume gets it anew)


@declared
class TrainConfig:
    model: ModelConfig = Field(default_factory=ModelConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return config.from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        return config.from_yaml(cls, path)

    def to_dict(self) -> dict[str, Any]:
        return config.to_dict(self)

    @model_validator(mode="after")
    def _resolve_and_check(self) -> "TrainConfig":
        if self.optim.aux_write_loss is None:  # the recipe's value for this task (see OptimConfig)
            resolved = RECIPE_AUX_WRITE_LOSS.get(self.task.name, 0.0)
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, aux_write_loss=resolved))
        o = self.optim
        second_order = (methods.get(self.memory.method).second_order and o.write_mode == "second_order"
                        and self.memory.write_steps > 0 and o.second_order_steps != 0)
        check_attention(o.attention, second_order)
        return self


# ---------------------------------------------------------------------------------------------- building
def build_task(cfg: TaskConfig, split: str = "train") -> Task:
    """The task's ``split`` (train | validation | test). Key-value data has no splits: the evaluation draws
    from its own seeds instead. ``file`` tasks have none here (Ray Data feeds them to the workers)."""
    if cfg.name == "babi":
        return babi.babi_task(cfg.tasks, split, cfg.babi_set, cfg.path, cfg.validation_fraction, cfg.split_seed,
                              cfg.answer_eos, cfg.chunks)
    if cfg.name == "squad":
        return squad.squad_task(cfg.variant, split, cfg.path, cfg.validation_fraction, cfg.test_fraction,
                                cfg.split_seed, cfg.answer_eos, cfg.chunks)
    if cfg.name == "file":
        raise ValueError("file tasks are read by Ray Data in the distributed trainer (jobs/train.py), not built here")
    return KVTask(pairs=cfg.pairs, chunks=tuple(cfg.chunks))


def build_tokenizer(cfg: TaskConfig, train_task: Task | None = None):
    """The tokenizer of a from-scratch reader: characters for key-value data, words of the train split for
    bAbI and SQuAD (``train_task`` saves loading it twice)."""
    if cfg.name in ("kv", "file"):
        return kv_tokenizer()
    task = train_task if train_task is not None else build_task(cfg, "train")
    return word_tokenizer(task.texts(), min_count=cfg.vocab_min_count, max_size=cfg.vocab_max_size)


def build_backbone_config(cfg: ModelConfig, vocab_size: int, tokenizer) -> Any:
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if cfg.arch == "llama":
        scaling = LLAMA3_ROPE if cfg.rope_scaling == "llama3" else {"rope_type": "default"}
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=cfg.tie_embeddings, rms_norm_eps=cfg.norm_eps,
            rope_parameters={**scaling, "rope_theta": cfg.rope_theta}, **ids,
        )
    return GPT2Config(
        vocab_size=vocab_size, n_embd=cfg.hidden_size, n_inner=cfg.intermediate_size, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_positions=cfg.max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=cfg.tie_embeddings, layer_norm_epsilon=cfg.norm_eps, **ids,
    )


def build_reader(cfg: TrainConfig, train_task: Task | None = None) -> Reader:
    """A trainable reader: from a reader directory, around a plain pretrained LM directory (fresh memory
    parameters, ``cfg.memory``), or a from-scratch backbone with the task's tokenizer."""
    dtype = getattr(torch, cfg.model.dtype)
    kv_stop = ["|"] if cfg.task.name in ("kv", "file") else []  # other tasks end their answers with EOS
    memory = MemoryConfig.from_dict({**cfg.memory.to_dict(), "answer_stop": cfg.memory.answer_stop or kv_stop})
    torch.manual_seed(cfg.model.seed)
    if cfg.model.pretrained and checkpoint.is_reader_dir(cfg.model.pretrained):
        reader = Reader.from_pretrained(cfg.model.pretrained, trainable=True).train()
    elif cfg.model.pretrained:
        logger.info("wrapping the language model %s into a new reader", cfg.model.pretrained)
        reader = Reader.from_language_model(cfg.model.pretrained, memory, dtype=dtype).train()
    else:
        tokenizer = build_tokenizer(cfg.task, train_task)
        backbone = build_backbone_config(cfg.model, len(tokenizer), tokenizer)
        reader = Reader.from_config(backbone, tokenizer, memory).to(dtype).train()
        if cfg.model.warm_start:
            warm_start(reader, cfg.model.warm_start)
    if cfg.optim.compile_write:
        reader.compile_write_step()
    return reader


def warm_start(reader: Reader, path: str | os.PathLike) -> None:
    """Copy every weight of the reader directory ``path`` into ``reader`` (same structure and vocabulary)."""
    source = Reader.from_pretrained(path, trainable=True)
    if source.tokenizer.get_vocab() != reader.tokenizer.get_vocab():
        raise ValueError(f"warm start {path}: its tokenizer differs from this run's")
    try:
        reader.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"warm start {path}: its weights do not fit this config's reader "
                         f"(method, memory size, heads and backbone must match): {err}") from None
    logger.info("warm start from %s (step-0 weights)", path)


# ---------------------------------------------------------------------------------------------- the step
def meta_step(
    reader: Reader, batch: Batch, optim: OptimConfig, steps: int, lr: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Outer loss of one batch, with its graph through the WRITE; metrics as detached 0-d tensors where they were
    computed. Reading a value on the host waits for the device; reading six of them before the backward made the
    host wait for the forward before it could queue a single backward kernel. The loop reads them together, after
    queueing the backward (``metric_values``)."""
    with attention_path(reader.lm, optim.attention), mixed_precision(reader.device, optim.autocast):
        out = methods.write(
            reader, batch.ctx_ids, batch.ctx_mask, steps, lr, mode=optim.write_mode,
            second_order_steps=optim.second_order_steps, final_stats=False, keep_last_loss=optim.aux_write_loss > 0,
        )
        read = read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask, out.lengths,
                                   batch.chunks)
        loss = read.loss.mean()
        if out.last_step_loss is not None:
            loss = loss + optim.aux_write_loss * out.last_step_loss
    no_write_loss = loss.new_full((), float("nan"))  # methods without a write-loss trajectory
    metrics = {
        "loss": loss.detach(),
        "read_loss": read.loss.detach().mean(),
        "write_loss_first": out.losses[:, 0].detach().mean() if out.losses.shape[1] else no_write_loss,
        "write_loss_last": out.losses[:, -1].detach().mean() if out.losses.shape[1] else no_write_loss,
        "em": read.exact_match.float().mean(),
        "token_acc": read.token_accuracy.float().mean(),
    }
    return loss, metrics


def metric_values(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """``meta_step``'s metrics as floats, in one device-to-host copy (one wait for the device, not one each)."""
    values = torch.stack([value.detach().float() for value in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def mixed_precision(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``dtype`` on the reader's device, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


@torch.no_grad()
def evaluate(
    reader: Reader, task: Task, samples: int, steps_list: list[int], lr: float, seed: Any = ("eval", 0),
    batch_size: int = 128, start: int = 0,
) -> dict[int, dict[str, float]]:
    """Exact match (teacher-forced), token accuracy and final write loss on held-out examples for each number of
    WRITE steps (EM and token accuracy per question; write loss and accuracy per context written, so per chunk
    for documents of several chunks). Key-value examples come from ``seed``; a fixed dataset (bAbI, SQuAD: pass its validation or
    test split) is walked in order from ``start``, at most ``samples`` examples, each counted once."""
    was_training = reader.training
    reader.eval()
    results: dict[int, dict[str, float]] = {}
    seed_seq = [hash_seed(seed)]
    samples = task.eval_size(samples, start)
    if samples < 1:
        raise ValueError(f"nothing to evaluate: {samples} samples (start {start})")
    try:
        for steps in steps_list:
            totals = {"em": 0.0, "token_acc": 0.0, "write_loss": 0.0, "write_acc": 0.0}
            done = written = 0
            for i, offset in enumerate(range(0, samples, batch_size)):
                n = min(batch_size, samples - offset)
                batch = task.eval_batch(start + offset, n, seed_seq + [i], reader.tokenizer).to(reader.device)
                with attention_path(reader.lm, "sdpa"):
                    out = methods.write(reader, batch.ctx_ids, batch.ctx_mask, steps, lr, mode="inference")
                    read = read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask,
                                               out.lengths, batch.chunks)
                totals["em"] += float(read.exact_match.sum())
                totals["token_acc"] += float(read.token_accuracy.sum())
                # methods with no write loss (the bounds) report NaN rather than a made-up number
                totals["write_loss"] += float(out.losses[:, -1].sum()) if out.losses.shape[1] else float("nan")
                totals["write_acc"] += float(out.accuracy.sum())
                done += n
                written += batch.ctx_ids.shape[0]  # contexts: a document's chunks each count once
            per = {"em": done, "token_acc": done, "write_loss": written, "write_acc": written}
            results[steps] = {k: v / per[k] for k, v in totals.items()}
    finally:
        reader.train(was_training)
    return results


def hash_seed(value: Any) -> int:
    """A stable integer seed from any JSON-able value (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(json.dumps(value).encode()).digest()[:8], "little")


def warmup_constant(warmup_steps: int):
    """Linear warm-up to the base lr over ``warmup_steps``, then constant (the paper's schedule)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Single-process meta-training of a reader (GradMem or a baseline: ``memory.method``) on a task: the shared
    ``gradmem.loop.TrainLoop`` with a ``LocalEngine`` (AdamW, warm-up schedule, clipping) and a ``FileReporter``.

    Output directory layout::

        config.yaml                     the resolved config
        metrics.jsonl                   one line per train / eval / stop event
        checkpoints/step_00000500/      the training checkpoint layout (gradmem/train_checkpoint.py): reader/,
                                        best/, optimizer_rank0.pt (loaded weights_only), trainer_state.json
        best/                           the best reader so far by validation (with ``run.eval_every``) + best.json
        reader/                         the exported reader: the best's when ``run.select_best``, else the last

    Data batches are a pure function of (seed, step), so a resumed run sees exactly the batches it would have.
    A checkpoint of the Ray Train loop with one worker and plain data parallel resumes here (``resume_from``),
    and this one's there (``jobs/train.py --resume-from``).

    Model selection follows the authors: every ``run.eval_every`` steps the reader is evaluated on validation data
    (key-value: its own seeded stream; bAbI/SQuAD: the validation split), the best (EM, then token accuracy) is kept,
    and training stops early after ``run.patience`` evaluations without a new best, at ``run.stop_at_em``, or at
    the ``run.max_seconds`` wall-time cap. Why it stopped is logged as a ``stop`` event in metrics.jsonl.
    Not supported: several processes (pipelines/train.py), gradient accumulation.
    """

    def __init__(self, cfg: TrainConfig, output_dir: str | os.PathLike, device: str | torch.device = "cpu"):
        from gradmem.loop import FileReporter, LocalEngine, TrainLoop  # gradmem.loop imports this module

        if cfg.task.name == "file":
            raise ValueError("the single-process Trainer generates or loads its data (kv, babi, squad); train on "
                             "files with jobs/train.py (Ray Data feeds the workers)")
        self.cfg = cfg
        self.output = Path(output_dir)
        self.task = build_task(cfg.task, "train")
        self.eval_task = build_task(cfg.task, "validation")  # key-value: the same generator, other seeds
        reader = build_reader(cfg, self.task).to(device)  # before the optimizer: its state lives there too
        self.engine = LocalEngine(reader, cfg.optim)
        self.reporter = FileReporter(self.output, cfg.run.keep_checkpoints)
        self.loop = TrainLoop(cfg, self.engine, self.reporter, self.train_batch, self.eval_task, self.output)

    # -- state (the loop's)
    @property
    def reader(self) -> Reader:
        return self.engine.reader

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self.engine.scheduler

    @property
    def step(self) -> int:
        return self.loop.step

    @step.setter
    def step(self, value: int) -> None:
        self.loop.step = value

    @property
    def stopped(self) -> str | None:
        """Why training stopped early (kept in checkpoints: a resume does not go on), or None."""
        return self.loop.stopped

    # -- data
    def train_batch(self, step: int, micro_step: int = 0, rank: int = 0) -> Batch:
        from gradmem.loop import batch_seed

        return self.task.batch(self.cfg.optim.batch_size, batch_seed(self.cfg.optim.seed, rank, step, micro_step),
                               self.reader.tokenizer)

    # -- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.reporter.checkpoint_root

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_root.glob("step_*")) if self.checkpoint_root.is_dir() else []
        return found[-1] if found else None

    def save_checkpoint(self) -> Path:
        self.reporter.report(self.step, {}, self.loop.save_checkpoint)
        self.loop.saved_step = self.step
        return self.checkpoint_root / f"step_{self.step:08d}"

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.loop.resume(Path(path))

    def log(self, record: dict[str, Any]) -> None:
        self.reporter.log(record)

    # -- model selection
    @property
    def best_dir(self) -> Path:
        return self.loop.best_dir

    def best_record(self) -> dict[str, Any] | None:
        """The best validation evaluation so far ({"step", "em", "token_acc"}), or None before the first."""
        return self.loop.best

    def keep_if_best(self, result: dict[str, float]) -> bool:
        """Save the reader as ``best/`` when ``result`` (a validation evaluation) beats the best so far."""
        return self.loop.keep_if_best(result)

    def stop_reason(self, result: dict[str, float]) -> str | None:
        """Why training should stop after this validation evaluation (None: go on)."""
        return self.loop.stop_reason(result)

    def evaluate(self, steps_list: list[int] | None = None) -> dict[int, dict[str, float]]:
        mem = self.reader.config
        return evaluate(self.reader, self.eval_task, self.cfg.run.eval_samples, steps_list or [mem.write_steps],
                        mem.write_lr, batch_size=self.cfg.run.eval_batch_size)

    def fit(self, max_steps: int | None = None, resume: bool = False,
            resume_from: str | os.PathLike | None = None) -> Path:
        """Train to ``max_steps`` (default: the config's), evaluating and checkpointing; export the reader.

        ``resume`` continues from this run's latest checkpoint; ``resume_from`` from a given checkpoint
        directory (one of the Ray Train loop's with one plain data-parallel worker included)."""
        with exclusive(self.output, "a training run"):  # two processes resuming one run would interleave it
            return self._fit(max_steps, resume, resume_from)

    def _fit(self, max_steps: int | None, resume: bool, resume_from: str | os.PathLike | None) -> Path:
        from gradmem.train_checkpoint import export_reader

        write_atomic(self.output / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        source = Path(resume_from) if resume_from is not None else self.latest_checkpoint() if resume else None
        if source is not None:
            self.load_checkpoint(source)
        elif resume:
            logger.info("no checkpoint under %s: starting from step 0", self.checkpoint_root)
        self.loop.run(self.cfg.optim.max_steps if max_steps is None else max_steps)
        chosen = self.loop.export_source(self.checkpoint_root / f"step_{self.step:08d}")
        export = export_reader(chosen, self.output / "reader")
        if chosen.name == "best":  # the reader in memory becomes the exported one (callers evaluate it next)
            self.reader.load_state_dict(Reader.from_pretrained(chosen, trainable=True).state_dict())
            best = self.best_record()
            logger.info("selected the best validation reader: step %d (EM %.4f, token accuracy %.4f)", best["step"],
                        best["em"], best["token_acc"])
        logger.info("reader exported to %s (fingerprint %s)", export, self.reader.fingerprint)
        return export
