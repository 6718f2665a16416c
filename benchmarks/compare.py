"""Methods side by side on a natural-language task (bAbI, SQuAD): same backbone, same budget, learning curves.

    # bAbI qa1, reader from scratch on this machine (2 cores: two one-thread processes on one output)
    python -m benchmarks.compare --config benchmarks/configs/babi_qa1_cpu.yaml --threads 1 --only gradmem,rmt &
    python -m benchmarks.compare --config benchmarks/configs/babi_qa1_cpu.yaml --threads 1 --only full_context,no_context
    python -m benchmarks.compare --config benchmarks/configs/babi_qa1_cpu.yaml   # rebuilds the report (all cells done)

    # SQuAD "C -> Q+A", reader from scratch on this machine
    python -m benchmarks.compare --config benchmarks/configs/squad_cqa_cpu.yaml --threads 1

    # the paper's settings on a GPU (a pretrained model directory from jobs/prepare_model.py)
    python jobs/prepare_model.py --output runs/smollm2
    python -m benchmarks.compare --config benchmarks/configs/babi_qa1_gpu.yaml

    # any configuration end to end in seconds: every method 5 steps
    python -m benchmarks.compare --config benchmarks/configs/babi_qa1_cpu.yaml --output /tmp/cmp_check --max-steps 5

The data come from the config's ``task.path`` or from ``GRADMEM_DATA`` (the directory holding babi/ and squad/).

For every entry of ``methods`` in a ``CompareConfig`` (GradMem and the baselines: RMT, full context, no
context), the same backbone is trained on the task's train split through the ordinary ``Trainer`` with the same
budget; its validation metrics every ``run.eval_every`` steps make the learning curve. Each trained reader is
then scored on ``test_split``: teacher-forced exact match for every K_eval in ``eval_steps`` (gradmem, rmt), and
greedy answers generated from memory alone, scored with the task's own metric (bAbI exact match of the answer
word; SQuAD's normalised EM and F1).

Output directory::

    cells/<name>.json       one finished method, written atomically the moment it finishes
    runs/<name>/            its Trainer directory (config.yaml, metrics.jsonl, reader/)
    results.json            every finished cell + config + commit + device
    results.md              the table
    compare.png             learning curves (validation EM and training READ loss vs step)

Resume: a cell whose json exists (with the same config) is skipped; one cut off while training continues from its
Trainer checkpoint. Several processes may work on one output directory with disjoint ``only`` lists (2 cores, two
one-thread processes): the results files are rebuilt from every finished cell on disk each time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import Field, model_validator

from benchmarks import common
from benchmarks.capacity import TRAINED_METHODS, BenchmarkConfig, MethodSpec, method_sections, same_cell_config
from benchmarks.common import device_name, git_commit, jsonable, pct, save_figure, write_atomic, write_json_atomic
from benchmarks.sweep import sweep_record, sweep_section, tune
from benchmarks.sweep import apply as sweep_apply
from gradmem.config import declared
from gradmem.data import tokenize
from gradmem.tasks.dataset import ExampleSet, evaluate_generated
from gradmem.train import TrainConfig, Trainer, build_task, evaluate

logger = logging.getLogger(__name__)

COMPARE_TASKS = ("babi", "squad")  # tasks with fixed splits and a generated-answer metric


@declared
class CompareConfig(BenchmarkConfig):
    """A base TrainConfig (its sections at the top level) and the methods to train on it."""

    test_split: Literal["validation", "test"] = Field("test", description="where the final scores come from "
                                                                          "(validation gives the learning curve)")
    test_samples: int | None = Field(None, ge=1, description="None: the whole split")
    eval_steps: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description="extra K_eval for "
                                                          "gradmem/rmt (the trained K always)")
    generate: bool = Field(True, description="also score greedy answers with the task's metric")
    max_new_tokens: int = Field(16, ge=1)
    eval_batch_size: int | None = Field(None, ge=1, description="None: the base run.eval_batch_size")

    @model_validator(mode="after")
    def _cells(self) -> "CompareConfig":
        """Fail before any training: every method's TrainConfig is built and validated here."""
        problems = [f"methods.{i}.write_lr: must be a number here (one alpha per method), got {spec.write_lr!r}"
                    for i, spec in enumerate(self.methods) if isinstance(spec.write_lr, dict)]
        if problems:
            raise ValueError("; ".join(problems))
        for spec in self.methods:
            try:
                cfg = self.cell_config(spec)
            except ValueError as exc:
                raise ValueError(f"method {spec.name}: {exc}") from None
            if cfg.task.name not in COMPARE_TASKS:
                raise ValueError(f"task.name: the comparison runs on {COMPARE_TASKS} (fixed splits, a task metric); "
                                 f"got {cfg.task.name!r} (key-value data: benchmarks.capacity)")
        return self

    def cell_config(self, spec: MethodSpec) -> TrainConfig:
        """The TrainConfig of one method: base, then its overrides, then its method, K, alpha and budget."""
        cfg = TrainConfig.from_dict(method_sections(self.base, spec, spec.write_lr))
        return sweep_apply(cfg, self.tuning[spec.name]) if spec.name in self.tuning else cfg

    def eval_steps_for(self, spec: MethodSpec, cfg: TrainConfig) -> list[int]:
        """K_eval of a method: the trained K plus the sweep for gradmem/rmt; the trained K alone for the bounds."""
        if spec.method not in TRAINED_METHODS:
            return [cfg.memory.write_steps]
        return sorted(set(self.eval_steps) | {cfg.memory.write_steps})

    def select(self, only: list[str] | None) -> list[MethodSpec]:
        if not only:
            return list(self.methods)
        unknown = sorted(set(only) - {s.name for s in self.methods})
        if unknown:
            raise ValueError(f"--only names {unknown} are not in the config's methods {[s.name for s in self.methods]}")
        return [s for s in self.methods if s.name in only]


def cell_fingerprint(cfg: CompareConfig, spec: MethodSpec) -> dict[str, Any]:
    """Everything that decides a cell's numbers: a finished cell is reused only if this is unchanged."""
    train_cfg = cfg.cell_config(spec)
    return jsonable({"train": train_cfg.to_dict(), "eval_steps": cfg.eval_steps_for(spec, train_cfg),
                     "test_split": cfg.test_split, "test_samples": cfg.test_samples, "generate": cfg.generate,
                     "max_new_tokens": cfg.max_new_tokens})


# ---------------------------------------------------------------------------------------------- one method
def learning_curve(metrics_path: Path) -> dict[str, list[dict[str, float]]]:
    """The Trainer's log as two series: ``eval`` (validation, every run.eval_every) and ``train`` (windows)."""
    curve: dict[str, list[dict[str, float]]] = {"eval": [], "train": []}
    if not metrics_path.exists():
        return curve
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        event = record.pop("event", None)
        if event in curve:
            curve[event].append(record)
    for series in curve.values():  # a resumed run logs the steps after its checkpoint again: keep the last
        by_step = {r["step"]: r for r in series}
        series[:] = [by_step[s] for s in sorted(by_step)]
    return curve


def check_context_lengths(trainer: Trainer, test: ExampleSet) -> None:
    """Fail before training if a context of the validation or test split is longer than the reader's WRITE accepts
    (``memory.max_context_tokens``): a reader refuses such contexts at answer time, and skipping them would bias
    the score."""
    limit = trainer.reader.max_context_tokens
    for split in (trainer.eval_task, test):
        longest = max(len(ids) for ids in tokenize(trainer.reader.tokenizer, sorted({e.context for e in split.items})))
        if longest > limit:
            raise ValueError(f"{split.name} holds a context of {longest} tokens, over memory.max_context_tokens = "
                             f"{limit}: raise it (and model.max_positions) so every question can be answered")


def run_cell(cfg: CompareConfig, spec: MethodSpec, output: Path, index: int, total: int,
             device: str = "cpu", command: list[str] | None = None) -> dict[str, Any]:
    """Train one method (continuing from its checkpoint if one matches), score it on the test split."""
    train_cfg = cfg.cell_config(spec)
    run_dir = output / "runs" / spec.name
    previous = run_dir / "config.yaml"
    if previous.exists() and TrainConfig.from_dict(yaml.safe_load(previous.read_text())).to_dict() != train_cfg.to_dict():
        logger.warning("%s: %s was trained with another config; starting it from scratch", spec.name, run_dir)
        shutil.rmtree(run_dir)
    o, mem = train_cfg.optim, train_cfg.memory
    logger.info("method %d/%d %s (%s, K %s, write lr %g): training %d steps x batch %d", index, total, spec.name,
                spec.method, mem.write_steps if spec.method in TRAINED_METHODS else "-", mem.write_lr,
                o.max_steps, o.batch_size)
    started = time.perf_counter()
    trainer = Trainer(train_cfg, run_dir, device=device)
    test = build_task(train_cfg.task, cfg.test_split)
    if not isinstance(test, ExampleSet):
        raise TypeError(f"{cfg.test_split} split of {train_cfg.task.name} is not a fixed example set")
    check_context_lengths(trainer, test)
    trainer.fit(resume=True)
    train_s = time.perf_counter() - started

    samples = min(cfg.test_samples or len(test), len(test))
    batch_size = cfg.eval_batch_size or train_cfg.run.eval_batch_size
    steps = cfg.eval_steps_for(spec, train_cfg)
    logger.info("method %d/%d %s: scoring %d %s examples (K_eval %s%s)", index, total, spec.name, samples,
                cfg.test_split, steps, ", generated answers" if cfg.generate else "")
    started = time.perf_counter()
    forced = evaluate(trainer.reader, test, samples, steps, mem.write_lr, batch_size=batch_size)
    generated, answers = None, []
    if cfg.generate:
        generated, answers = evaluate_generated(trainer.reader, test, samples, steps=mem.write_steps, lr=mem.write_lr,
                                                max_new_tokens=cfg.max_new_tokens, batch_size=batch_size)
    eval_s = time.perf_counter() - started
    curve = learning_curve(run_dir / "metrics.jsonl")
    best_k = max(steps, key=lambda k: (forced[k]["em"], -k))
    step_times = [r["step_s"] for r in curve["train"] if r.get("step_s") is not None]
    cell = {
        "name": spec.name, "method": spec.method, "task": train_cfg.task.name,
        "k_train": mem.write_steps if spec.method in TRAINED_METHODS else None, "write_lr": mem.write_lr,
        "num_memory": mem.num_memory, "hidden_size": trainer.reader.d_model,
        "parameters": sum(p.numel() for p in trainer.reader.parameters()),
        "budget": {"max_steps": o.max_steps, "batch_size": o.batch_size, "train_samples": o.max_steps * o.batch_size,
                   "max_seconds": train_cfg.run.max_seconds, "trained_steps": trainer.step},
        "stopped": trainer.stopped, "selected": trainer.best_record(),  # validation-selected step, never test
        "test_split": cfg.test_split, "test_samples": samples,
        "teacher_forced": {str(k): forced[k] for k in steps}, "em_trained": forced[mem.write_steps]["em"],
        "best_k_eval": best_k, "em_best": forced[best_k]["em"],
        "generated": generated,
        "examples": [{"context": e.context, "query": e.query, "gold": list(g), "answer": a}
                     for e, g, a in zip(test.ordered(0, 8), test.golds[:8], answers[:8])],
        "curve": curve,
        "train_wall_s": train_s, "eval_wall_s": eval_s, "command": command, "device": device_name(device),
        "seconds_per_step": sum(step_times) / len(step_times) if step_times else None,  # training steps only
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cell_config": cell_fingerprint(cfg, spec),
    }
    return jsonable(cell)


# ---------------------------------------------------------------------------------------------- all methods
def finished_cells(cfg: CompareConfig, output: Path) -> dict[str, dict[str, Any]]:
    """The cells on disk; one produced by another config is an error rather than a silent mix."""
    cells = {}
    for spec in cfg.methods:
        path = output / "cells" / f"{spec.name}.json"
        if not path.exists() or (cfg.sweep is not None and spec.name not in cfg.tuning):
            continue  # not finished, or its sweep has not picked yet (so it cannot be finished)
        done = json.loads(path.read_text())
        if not same_cell_config(done.get("cell_config"), cell_fingerprint(cfg, spec)):
            raise ValueError(f"{path} was produced by a different config than this one; use another --output or "
                             f"delete that file to retrain the method")
        cells[spec.name] = done
    return cells


def run_compare(cfg: CompareConfig, output: str | os.PathLike, only: list[str] | None = None,
                max_steps: int | None = None, command: list[str] | None = None,
                repo_root: str | os.PathLike | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train and score every selected method not already finished under ``output``. Returns results.json's dict.

    ``max_steps`` overrides every method's budget (smoke runs); it is part of the cells' config."""
    cfg = cfg.with_max_steps(max_steps)
    output = Path(output)
    (output / "cells").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cfg.sweep is not None:
        cfg = cfg.with_tuning(tune(cfg.methods, cfg.sweep, output, cfg.cell_config, only=only, device=device))
    selected = cfg.select(only)
    done = finished_cells(cfg, output)
    todo = [s for s in selected if s.name not in done]
    if len(todo) < len(selected):
        logger.info("resuming: skipping finished %s", ", ".join(s.name for s in selected if s.name in done))
    meta = {"command": command, "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "device": device_name(device), **git_commit(Path(repo_root) if repo_root else Path.cwd())}
    budgets = {s.name: (cfg.cell_config(s).optim.max_steps, cfg.cell_config(s).optim.batch_size) for s in cfg.methods}
    if len(set(budgets.values())) > 1:
        logger.warning("training budgets differ between methods: %s", budgets)
    durations: list[float] = []
    for i, spec in enumerate(todo, start=1):
        cell_started = time.perf_counter()
        cell = run_cell(cfg, spec, output, i, len(todo), device=device, command=command)
        cell.update(commit=meta["commit"], dirty=meta["dirty"])  # the code that trained this method
        write_json_atomic(output / "cells" / f"{spec.name}.json", cell)
        shutil.rmtree(output / "runs" / spec.name / "checkpoints", ignore_errors=True)  # reader/ stays
        durations.append(time.perf_counter() - cell_started)
        generated = cell["generated"] or {}
        logger.info("method %d/%d %s done: test EM %.3f teacher-forced, %s generated | elapsed %.0fs, eta %.0fs", i,
                    len(todo), spec.name, cell["em_trained"],
                    ", ".join(f"{k} {v:.3f}" for k, v in generated.items()) or "-", time.perf_counter() - started,
                    sum(durations) / len(durations) * (len(todo) - i))
        write_results(cfg, output, meta)
    return write_results(cfg, output, meta)


def write_results(cfg: CompareConfig, output: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """results.json, results.md and compare.png from every finished cell on disk (each replaced atomically)."""
    cells = finished_cells(cfg, output)
    ordered = [cells[s.name] for s in cfg.methods if s.name in cells]
    summary = jsonable({
        **meta, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cells_wall_s": sum(c["train_wall_s"] + c["eval_wall_s"] for c in ordered),
        "complete": len(ordered) == len(cfg.methods), "config": cfg.to_dict(), "cells": ordered,
        "sweep": {s.name: r for s in cfg.methods if (r := sweep_record(output, s.name)) is not None},
    })
    write_json_atomic(output / "results.json", summary)
    write_atomic(output / "results.md", render_markdown(cfg, summary))
    plot(cfg, summary, output / "compare.png")
    return summary


# ---------------------------------------------------------------------------------------------- reports
def task_title(train_cfg: TrainConfig) -> str:
    t = train_cfg.task
    if t.name == "babi":
        return f"bAbI {'+'.join(t.tasks)} ({t.babi_set})"
    return f"SQuAD v1.1 {t.variant} (dev set split by article)"


def render_markdown(cfg: CompareConfig, summary: dict[str, Any]) -> str:
    cells = summary["cells"]
    first = cfg.cell_config(cfg.methods[0])
    backbone = (f"pretrained {first.model.pretrained}" if first.model.pretrained else
                f"{first.model.arch}, {first.model.num_layers} layers, d = {first.model.hidden_size}, from scratch "
                f"(seed {first.model.seed}), word-level tokenizer")
    status = "complete" if summary["complete"] else f"INCOMPLETE: {len(cells)}/{len(cfg.methods)} methods"
    commands = list(dict.fromkeys(" ".join(c["command"]) for c in cells if c.get("command")))
    metrics = sorted({k for c in cells for k in (c["generated"] or {})})
    lines = [
        f"# {task_title(first)}: GradMem vs the baselines",
        "",
        f"- {status}; trained by: " + ("; ".join(f"`{c}`" for c in commands) or "(not recorded in these cells)")
        + f"; this report by: `{' '.join(summary.get('command') or []) or '-'}`",
        f"- commit: {summary.get('commit') or '-'}{' (with uncommitted changes)' if summary.get('dirty') else ''}",
        (f"- wall time: {summary['cells_wall_s']:.0f} s over all methods; {summary.get('device', '-')}, "
         f"{summary.get('threads', '-')} torch threads per process, torch {summary['torch_version']}"),
        f"- backbone: {backbone}; memory {first.memory.num_memory} vectors (gradmem, rmt)",
        (f"- scores on the {cfg.test_split} split ({cells[0]['test_samples'] if cells else '-'} questions): "
         "teacher-forced EM of the answer tokens, and greedy answers generated from memory alone scored with the "
         "task metric"),
        "",
        "| method | K train | alpha | budget | s / step | teacher-forced EM | best EM over K_eval | "
        + " | ".join(f"generated {m.upper()}" for m in metrics) + (" |" if metrics else "|"),
        "|---|---|---|---|---|---|---|" + "---|" * len(metrics),
    ]
    for c in cells:
        generated = c["generated"] or {}
        trained = c["method"] in TRAINED_METHODS
        sps = f"{c['seconds_per_step']:.3f}" if c.get("seconds_per_step") else "-"
        lines.append(
            f"| {c['name']} ({c['method']}) | {c['k_train'] if trained else '-'} | "
            f"{c['write_lr'] if c['method'] == 'gradmem' else '-'} | {c['budget']['max_steps']} x "
            f"{c['budget']['batch_size']} | {sps} | {pct(c['em_trained'])} | "
            f"{pct(c['em_best']) + ' @K' + str(c['best_k_eval']) if trained else '-'} | "
            + " | ".join(pct(generated.get(m)) for m in metrics) + (" |" if metrics else "|"))
    lines += ["", "Validation EM (teacher-forced) during training:", ""]
    steps = sorted({r["step"] for c in cells for r in c["curve"]["eval"]})
    if steps:
        lines += ["| step | " + " | ".join(c["name"] for c in cells) + " |", "|---|" + "---|" * len(cells)]
        for step in steps:
            row = []
            for c in cells:
                found = [r for r in c["curve"]["eval"] if r["step"] == step]
                row.append(pct(found[0]["em"]) if found else "")
            lines.append(f"| {step} | " + " | ".join(row) + " |")
    if any(c["examples"] for c in cells):
        lines += ["", "First test questions, answered from memory:", ""]
        for c in cells:
            for e in c["examples"][:3]:
                lines.append(f"- {c['name']}: {e['query']!r} -> {e['answer']!r} (gold {e['gold'][0]!r})")
    lines += sweep_section(summary.get("sweep") or {})
    return "\n".join(lines) + "\n"


def plot(cfg: CompareConfig, summary: dict[str, Any], path: Path) -> None:
    """Two panels: validation EM vs step (teacher-forced) and training READ loss vs step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("v", ":")]  # overlapping curves (e.g. two at chance) stay visible
    for i, c in enumerate(cells):
        evals, trains = c["curve"]["eval"], c["curve"]["train"]
        marker, dash = styles[i % len(styles)]
        line, = left.plot([r["step"] for r in evals], [100 * r["em"] for r in evals], marker=marker, linestyle=dash,
                          markersize=4, label=c["name"])
        right.plot([r["step"] for r in trains], [r["read_loss"] for r in trains], linestyle=dash,
                   color=line.get_color(), label=c["name"])
    title = task_title(cfg.cell_config(cfg.methods[0]))
    left.set_xlabel("training step")
    left.set_ylabel("validation exact match % (teacher-forced)")
    left.set_ylim(-3, 103)
    left.set_title(f"{title}: validation EM", fontsize=10)
    left.legend(fontsize=8)
    right.set_xlabel("training step")
    right.set_ylabel("READ loss (train batches)")
    right.set_yscale("log")
    right.set_title("training READ loss", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- command line
def load_config(path: str, only: list[str] | None) -> CompareConfig:
    """The config at ``path``, with ``only`` checked against its methods (ValueError)."""
    cfg = CompareConfig.from_yaml(path)
    cfg.select(only)
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.grid_main("compare", __doc__, "benchmarks/configs/{babi,squad}_*.yaml", load_config, run_compare, argv)


if __name__ == "__main__":
    main()
