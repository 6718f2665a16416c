"""The meta-training loop: one lifecycle shared by the single-process ``Trainer`` and the Ray Train workers.

``TrainLoop`` decides everything a training run decides: resuming from a checkpoint, the step (the meta-step
per micro-batch, backward, the finiteness check, the update; with several ranks the check comes before the
backward), metric windows, when to log, evaluate and save, the best reader by validation EM, when and why to stop
(``run.patience``, ``run.stop_at_em``, ``run.max_seconds``), and which reader a run exports. What differs between
a plain process and a distributed worker sits behind two small interfaces:

- an ``Engine`` owns the optimizer (AdamW with the warm-up schedule, ``build_optimizer``) and does backward, the
  gradient reduction and the update. ``LocalEngine`` is the plain one; pipelines/train.py adds plain data
  parallel and DeepSpeed ZeRO 0-2.
- a ``Reporter`` receives each step's events (train window, eval, stop) and persists checkpoints:
  ``FileReporter`` writes metrics.jsonl and ``checkpoints/step_*`` here; on Ray Train, ``ray.train.report``
  with a Ray checkpoint.

Lifecycle (as torchtune's recipes): the caller validates the config and sets up (reader, engine, reporter,
data) -> ``resume`` (optional) -> ``run`` -> the final checkpoint is always written -> export from it.

Every rank runs the same sequence of reductions, evaluations and checkpoints: decisions are taken on reduced
values (the evaluation, the wall-time cap), so all ranks take them together. Rank 0 alone writes the best
reader and the shared checkpoint files. Not supported: resuming with another world size or optimizer format.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from gradmem import train_checkpoint
from gradmem.atomic import atomic_path
from gradmem.data import Batch
from gradmem.reader import Reader
from gradmem.tasks.dataset import ExampleSet
from gradmem.train import OptimConfig, Task, TrainConfig, evaluate, meta_step, metric_values, warmup_constant

logger = logging.getLogger(__name__)

Batches = Callable[[int, int], Batch]  # (step, micro-step) -> this rank's batch
Save = Callable[[Path], None]  # writes this rank's part of a checkpoint into a directory


# ------------------------------------------------------------------------------------------------ set-up
def build_optimizer(reader: Reader, optim: OptimConfig):
    """AdamW over the trainable parameters with the paper's schedule (linear warm-up, then constant)."""
    params = [p for p in reader.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(optim.warmup_steps))


def batch_seed(seed: int, rank: int, step: int, micro_step: int) -> list[int]:
    """The data seed of one micro-batch: no two ranks, steps or micro-steps share one, and a resumed run draws
    what it would have drawn. Micro-step 0 leaves it out, so one process and one worker draw the same batches."""
    return [seed, rank, step] if micro_step == 0 else [seed, rank, step, micro_step]


def task_batches(task: Task, size: int, seed: int, rank: int, tokenizer) -> Batches:
    """Batches of ``size`` drawn from ``task`` by ``batch_seed`` (bAbI, SQuAD: sampled from the train split)."""
    return lambda step, micro_step: task.batch(size, batch_seed(seed, rank, step, micro_step), tokenizer)


# ------------------------------------------------------------------------------------------------ interfaces
class Engine(Protocol):
    """What the loop needs from a process's parallelism."""

    name: str  # written into checkpoints
    optimizer_format: str  # a checkpoint resumes only into an engine of the same format and world size
    zero_stage: int | None
    reader: Reader  # the module the meta-step runs on
    rank: int
    world: int
    accumulation: int  # micro-batches per optimizer step

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Reduce gradients, clip, step the optimizer and the schedule, clear gradients; the gradient norm."""

    def lr(self) -> float: ...

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]: ...

    def optimizer_state(self) -> dict[str, Any]: ...

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...


class Reporter(Protocol):
    def report(self, step: int, events: dict[str, dict[str, Any]], save: Save | None) -> None:
        """Called on every rank after a step with something to say: ``events`` maps train / eval / stop to their
        values; with ``save``, also persist a checkpoint of this step (``save`` writes this rank's part)."""


class LocalEngine:
    """One process: AdamW on the whole reader, gradient clipping, no reduction."""

    name, optimizer_format, zero_stage = "local", "torch", None

    def __init__(self, reader: Reader, optim: OptimConfig, rank: int = 0, world: int = 1):
        self.reader, self.rank, self.world, self.accumulation = reader, rank, world, 1
        self.optimizer, self.scheduler = build_optimizer(reader, optim)
        self.grad_clip = optim.grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_gradients(self) -> None:
        """Nothing to reduce in one process (data parallel all-reduces here)."""

    def step(self) -> float:
        self.reduce_gradients()
        params = [p for p in self.reader.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def optimizer_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class FileReporter:
    """The in-process reporter: events as lines of ``output/metrics.jsonl``, checkpoints under
    ``output/checkpoints/step_*`` (written atomically; the newest ``keep`` are kept)."""

    def __init__(self, output: Path, keep: int):
        self.output, self.keep = output, keep

    @property
    def checkpoint_root(self) -> Path:
        return self.output / "checkpoints"

    def log(self, record: dict[str, Any]) -> None:
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json_line(record))

    def report(self, step: int, events: dict[str, dict[str, Any]], save: Save | None) -> None:
        for event, values in events.items():
            self.log({"event": event, "step": step, **values})
        if save is not None:
            final = self.checkpoint_root / f"step_{step:08d}"
            with atomic_path(final) as tmp:
                tmp.mkdir()
                save(tmp)
            for old in sorted(self.checkpoint_root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint step %d -> %s", step, final)


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


# ------------------------------------------------------------------------------------------------ the loop
class TrainLoop:
    """Meta-training of ``engine.reader`` on ``batches``; validation on ``eval_task`` (None: no evaluation, so no
    model selection and no early stop on EM). ``work_dir`` holds ``best/`` (rank 0)."""

    def __init__(self, cfg: TrainConfig, engine: Engine, reporter: Reporter, batches: Batches,
                 eval_task: Task | None, work_dir: Path):
        self.cfg, self.engine, self.reporter, self.batches, self.eval_task = cfg, engine, reporter, batches, eval_task
        self.best_dir = Path(work_dir) / "best"
        self.step = 0
        self.stopped: str | None = None  # why training stopped early (kept in checkpoints: a resume does not go on)
        self.best = train_checkpoint.read_best(self.best_dir)  # {"step", "em", "token_acc"} of the best evaluation
        self.saved_step: int | None = None  # the step of the latest checkpoint written or resumed

    @property
    def reader(self) -> Reader:
        return self.engine.reader

    @property
    def is_main(self) -> bool:
        return self.engine.rank == 0

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "stopped": self.stopped, "best": self.best, "config": self.cfg.to_dict()}

    def save_checkpoint(self, directory: Path) -> None:
        best = self.best_dir if self.best is not None and self.best_dir.is_dir() else None
        train_checkpoint.save(directory, self.engine, self.state(), best)

    def resume(self, directory: Path) -> None:
        """Continue from a checkpoint: weights, this rank's optimizer and schedule, step, stop, best reader."""
        state = train_checkpoint.load(directory, self.engine)
        self.step, self.stopped, self.saved_step = int(state["step"]), state.get("stopped"), int(state["step"])
        if "best" in state:  # checkpoints before the field: the best reader on disk stays the reference
            self.best = state["best"]
            if self.is_main:
                train_checkpoint.restore_best(directory, self.best_dir)
        logger.info("rank %d resumed at step %d from %s", self.engine.rank, self.step, directory)

    # -- model selection
    def validate(self) -> dict[str, float]:
        """Validation EM, token accuracy and write loss at the trained number of WRITE steps; each rank scores its
        own slice (key-value: its own seeded stream), the results are averaged over ranks."""
        run, mem, rank, world = self.cfg.run, self.reader.config, self.engine.rank, self.engine.world
        available = len(self.eval_task) if isinstance(self.eval_task, ExampleSet) else run.eval_samples
        per_rank = max(1, min(run.eval_samples, available) // world)
        result = evaluate(self.reader, self.eval_task, per_rank, [mem.write_steps], mem.write_lr, seed=("eval", rank),
                          batch_size=run.eval_batch_size, start=rank * per_rank)[mem.write_steps]
        return self.engine.all_reduce_mean(result)

    def keep_if_best(self, result: dict[str, float]) -> bool:
        """Keep the reader as ``best/`` when ``result`` (a validation evaluation) beats the best so far (EM, then
        token accuracy)."""
        if self.best is not None and (result["em"], result["token_acc"]) <= (self.best["em"], self.best["token_acc"]):
            return False
        self.best = {"step": self.step, "em": result["em"], "token_acc": result["token_acc"]}
        if self.is_main:
            with atomic_path(self.best_dir) as tmp:
                self.reader.save_pretrained(tmp)
                (tmp / train_checkpoint.BEST_FILE).write_text(json_line(self.best))
        return True

    def stop_reason(self, result: dict[str, float]) -> str | None:
        """Why training should stop after this validation evaluation (None: go on)."""
        run, best = self.cfg.run, self.best
        if run.stop_at_em is not None and result["em"] >= run.stop_at_em:
            return f"validation EM {result['em']:.4f} reached stop_at_em {run.stop_at_em}"
        if run.patience is not None and best is not None:
            evals_since = (self.step - best["step"]) // run.eval_every
            if evals_since >= run.patience:
                return f"no better validation EM for {evals_since} evaluations (best {best['em']:.4f} at step {best['step']})"
        return None

    # -- training
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``engine.accumulation`` micro-batches; their metrics averaged."""
        mem, rank = self.reader.config, self.engine.rank
        micro_metrics = []
        for micro_step in range(self.engine.accumulation):
            batch = self.batches(self.step, micro_step).to(self.reader.device)
            loss, on_device = meta_step(self.reader, batch, self.cfg.optim, mem.write_steps, mem.write_lr)
            # Read on the host after the backward is queued (the device never waits on the host), and checked before
            # the optimizer step (no weight has changed). With several ranks, before the backward: ranks average
            # gradients there (DeepSpeed inside it), and the others would step on this rank's NaN.
            check_first = self.engine.world > 1
            if check_first:
                metrics = self._finite(on_device, rank)
            self.engine.backward(loss)
            if not check_first:
                metrics = self._finite(on_device, rank)
            micro_metrics.append({**metrics, "samples": float(len(batch))})
        metrics = {k: sum(m[k] for m in micro_metrics) / len(micro_metrics) for k in micro_metrics[0]}
        metrics["samples"] *= len(micro_metrics)
        metrics["grad_norm"] = self.engine.step()
        self.step += 1
        return metrics

    def _finite(self, on_device: dict[str, torch.Tensor], rank: int) -> dict[str, float]:
        """The step's metrics read on the host (one copy), or a FloatingPointError when the outer loss is not
        finite."""
        metrics = metric_values(on_device)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"rank {rank}: non-finite outer loss at step {self.step}: {metrics}")
        return metrics

    def time_is_up(self, started: float) -> bool:
        """The wall-time cap, agreed by every rank (one rank's clock must not stop it alone)."""
        cap = self.cfg.run.max_seconds
        if cap is None:
            return False
        over = float(time.perf_counter() - started >= cap)
        return self.engine.all_reduce_mean({"over": over})["over"] > 0

    def run(self, total: int) -> None:
        """Train to step ``total`` or an early stop, reporting, evaluating and saving on schedule; always end on
        a checkpoint of the last step (what a resume and the export read)."""
        run = self.cfg.run
        self.reader.train()
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        timed_from: tuple[float, int] | None = None  # throughput counts from the end of the first step (warm-up)
        stop = self.stopped
        while self.step < total and stop is None:
            step_started = time.perf_counter()
            metrics = self.train_step()
            metrics["step_s"] = time.perf_counter() - step_started  # data + meta-step + update, no evaluation
            window.append(metrics)
            if self.time_is_up(started):
                stop = f"wall-time cap max_seconds {run.max_seconds:g} reached"
            final = self.step >= total or stop is not None
            events: dict[str, dict[str, Any]] = {}
            if self.step % run.log_every == 0 or final:
                events["train"] = self.summarize(window, total, timed_from or (started, self.step - 1))
                window = []
            if timed_from is None:
                timed_from = (time.perf_counter(), self.step)
            if self.eval_task is not None and run.eval_every and (self.step % run.eval_every == 0 or final):
                result = self.validate()
                improved = self.keep_if_best(result)
                events["eval"] = {**result, "best": improved}
                if self.is_main:
                    logger.info("eval step %d: em %.4f token_acc %.4f write_loss %.3f%s", self.step, result["em"],
                                result["token_acc"], result["write_loss"], " (best)" if improved else "")
                stop = stop or self.stop_reason(result)
            if stop is not None:
                self.stopped = stop
                events["stop"] = {"reason": stop}
                if self.is_main:
                    logger.info("stopped at step %d: %s", self.step, stop)
            save = bool(run.save_every and self.step % run.save_every == 0) or self.step >= total or stop is not None
            if events or save:
                self.reporter.report(self.step, events, self.save_checkpoint if save else None)
            if save:
                self.saved_step = self.step
        if self.saved_step != self.step:
            self.reporter.report(self.step, {}, self.save_checkpoint)
            self.saved_step = self.step

    def summarize(self, window: list[dict[str, float]], total: int, since: tuple[float, int]) -> dict[str, float]:
        """The window's mean metrics over every rank, the learning rate, throughput and the time left."""
        samples = sum(m.pop("samples") for m in window) * self.engine.world
        avg = self.engine.all_reduce_mean({k: sum(m[k] for m in window) / len(window) for k in window[0]})
        elapsed, steps = max(time.perf_counter() - since[0], 1e-9), max(self.step - since[1], 1)
        rate = steps / elapsed
        record = {"lr": self.engine.lr(), "samples_per_s": samples / len(window) * rate, "eta_s": (total - self.step) / rate,
                  **avg}
        if self.is_main:
            logger.info("step %d/%d loss %.4f read %.4f write %.3f->%.3f em %.3f | %.2f steps/s, eta %.0fs", self.step,
                        total, avg["loss"], avg["read_loss"], avg["write_loss_first"], avg["write_loss_last"], avg["em"],
                        rate, record["eta_s"])
        return record

    def export_source(self, checkpoint: Path) -> Path:
        """The reader directory a run exports from its final checkpoint (the best by validation when selected)."""
        return train_checkpoint.export_source(checkpoint, self.cfg.run.select_best)
