"""Composed READ over a long document's chunk memories (issue 15, item 3): EM against the number of chunks c.

    # the key-value measurement on this machine (one core; estimated wall time in the YAML's header)
    python -m benchmarks.compose --config benchmarks/configs/compose_kv_cpu.yaml --output runs/compose_kv_cpu --threads 1

    # two one-thread processes on one output (2 cores), then the report from every finished cell
    python -m benchmarks.compose --config benchmarks/configs/compose_kv_cpu.yaml --output runs/compose_kv_cpu --threads 1 --only gradmem &
    python -m benchmarks.compose --config benchmarks/configs/compose_kv_cpu.yaml --output runs/compose_kv_cpu --threads 1 --only rmt,full_context
    python -m benchmarks.compose --config benchmarks/configs/compose_kv_cpu.yaml --output runs/compose_kv_cpu

    # any configuration end to end in about a minute: every cell 20 training steps
    python -m benchmarks.compose --config benchmarks/configs/compose_kv_cpu.yaml --output /tmp/compose_check --max-steps 20 --threads 1

For every method (gradmem, rmt with the same memory per chunk; full_context as the bound) and every training
regime of a ``ComposeConfig`` (``regimes``: a name and the ``task.chunks`` range trained on, e.g. ``[1, 1]``, memories
trained one at a time, against ``[1, 4]``, trained with composition), a reader is trained through the ordinary
``Trainer`` (best by validation, patience, step cap; resumable from its checkpoint). Then, on held-out documents of
exactly c chunks for each c in ``eval_chunks``:

- composed EM: teacher-forced exact match of the READ over ``[M_1; ...; M_c; Q]`` (``gradmem.read.compose``; for
  full_context the whole document's tokens, the full-context bound);
- oracle-chunk EM: the same documents and the same memories, the READ given only the memory of the chunk that holds
  the answer (key-value: the chunk containing the queried ``!KK:``). bAbI has no oracle here: its examples keep the
  story's statements but not which of them support the answer (the supporting ids count question lines too), so
  the oracle column is left empty for it;
- what composition costs at READ: prefix rows and bytes per query, and the seconds per query of the composed
  teacher-forced READ and of greedy answers (``Reader.answer(..., chunks=)``), every c timed round-robin in the same
  process (medians), reported as ratios to c = 1.

Output directory::

    cells/<method>-<regime>.json   one finished (method, regime), written atomically the moment it finishes
    runs/<method>-<regime>/        its Trainer directory (config.yaml, metrics.jsonl, reader/)
    results.json                   every finished cell + config + commit + device + wall times
    results.md                     EM by c per method and regime, oracle and full-context bounds, READ cost by c
    compose.png                    EM vs c (one line per method x regime; oracle and full context dashed), cost vs c

Resume: a cell whose json exists (with the same config) is skipped; one cut off while training continues from its
Trainer checkpoint; one cut off while measuring measures again. Processes with disjoint ``--only`` lists may share
one output directory; the reports are rebuilt from every finished cell on disk each time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from benchmarks import common
from benchmarks.capacity import NAME_PATTERN, TRAINED_METHODS, BenchmarkConfig, MethodSpec, method_sections, same_cell_config
from benchmarks.common import device_name, git_commit, jsonable, pct, save_figure, write_atomic, write_json_atomic
from benchmarks.compare import learning_curve
from benchmarks.sweep import sweep_record, sweep_section, tune
from benchmarks.sweep import apply as sweep_apply
from gradmem import methods
from gradmem.attention import attention_path
from gradmem.config import declared
from gradmem.data import Batch, Example, collate
from gradmem.read import read_teacher_forced
from gradmem.reader import Reader
from gradmem.tasks.dataset import ExampleSet
from gradmem.tasks.kv import UNSCORED, KVTask
from gradmem.train import TaskConfig, TrainConfig, Trainer, build_task

logger = logging.getLogger(__name__)

COMPOSE_TASKS = ("kv", "babi")
KV_READ_TOKENS = len("?!KK:") + len("VV!|")  # a key-value query and its target, in characters = tokens


@declared
class RegimeSpec:
    """One training regime: the range of chunks per document the reader is trained on (``task.chunks``)."""

    name: str = Field(description="names the cells' files: letters, digits, '_', '.', '-'")
    chunks: list[int] = Field(description="task.chunks [lo, hi] for training; [1, 1]: memories trained one at a time")

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value) or "-" in value:
            raise ValueError(f"regime name {value!r} must be letters, digits, '_', '.' (it names files after a '-')")
        return value


@declared
class ComposeConfig(BenchmarkConfig):
    """A base TrainConfig (its sections at the top level), the methods, the training regimes and the c measured."""

    regimes: list[RegimeSpec] = Field(default_factory=list, validate_default=True,
                                      description="training regimes: {name, chunks: [lo, hi]}")
    eval_chunks: list[int] = Field(default_factory=lambda: list(range(1, 9)), description="c measured (documents of "
                                                                                           "exactly c chunks)")
    eval_samples: int = Field(256, ge=1, description="documents per c (bAbI: the first of the split)")
    eval_seed: int = Field(1234, description="key-value: the held-out documents' seed (training uses optim.seed)")
    test_split: Literal["validation", "test"] = Field("test", description="bAbI: the split measured")
    eval_batch_size: int | None = Field(None, ge=1, description="None: the base run.eval_batch_size")
    latency_batch: int = Field(16, ge=1, description="queries per timed READ")
    latency_repeats: int = Field(5, ge=1, description="timed rounds over every c (median), after a warm-up round")
    max_new_tokens: int = Field(8, ge=1, description="greedy answers (timed)")

    @field_validator("regimes")
    @classmethod
    def _regimes(cls, regimes: list[RegimeSpec]) -> list[RegimeSpec]:
        if not regimes:
            raise ValueError("the config needs at least one entry under `regimes:` ({name, chunks: [lo, hi]})")
        names = [r.name for r in regimes]
        if len(set(names)) != len(names):
            raise ValueError(f"regime names must be unique, got {names}")
        return regimes

    @field_validator("eval_chunks")
    @classmethod
    def _eval_chunks(cls, chunks: list[int]) -> list[int]:
        if not chunks or any(c < 1 for c in chunks) or chunks != sorted(set(chunks)) or chunks[0] != 1:
            raise ValueError(f"eval_chunks must be increasing, distinct, >= 1 and start at 1 (the ratios' base), "
                             f"got {chunks}")
        return chunks

    @model_validator(mode="after")
    def _cells(self) -> "ComposeConfig":
        """Fail before any training: every cell's TrainConfig builds, and a key-value READ of the longest document
        fits the backbone's positions (bAbI's lengths are only known from its data: the READ refuses them then)."""
        if self.sweep is not None and (self.sweep.pairs is not None or self.sweep.per_pairs):
            raise ValueError("sweep.pairs and sweep.per_pairs are capacity settings: the composition benchmark sweeps "
                             "every (method, regime) cell on its own documents")
        for spec in self.methods:
            for regime in self.regimes:
                try:
                    cfg = self.cell_config(spec, regime)
                except ValueError as exc:
                    raise ValueError(f"method {spec.name}, regime {regime.name}: {exc}") from None
                if cfg.task.name not in COMPOSE_TASKS:
                    raise ValueError(f"task.name: composition is measured on {COMPOSE_TASKS}, got {cfg.task.name!r}")
                if cfg.task.name == "kv":
                    check_kv_positions(cfg, max(max(self.eval_chunks), regime.chunks[1]))
        return self

    def cell_config(self, spec: MethodSpec, regime: RegimeSpec, tuned: bool = True) -> TrainConfig:
        """The TrainConfig of one cell: base, then the method's overrides, K, alpha and budget, then the regime,
        then (``tuned``) the lr and alpha its sweep picked. Every cell is swept on its own regime: the documents a
        regime trains on change what a good lr is, and each cell gets the same candidates and steps."""
        if isinstance(spec.write_lr, dict):
            raise ValueError(f"write_lr must be one number here, got {spec.write_lr!r}")
        data = method_sections(self.base, spec, spec.write_lr)
        data["task"] = {**(data.get("task") or {}), "chunks": list(regime.chunks)}
        cfg = TrainConfig.from_dict(data)
        name = cell_name(spec, regime)
        return sweep_apply(cfg, self.tuning[name]) if tuned and name in self.tuning else cfg

    def tuned_ready(self, spec: MethodSpec, regime: RegimeSpec) -> bool:
        """Whether this cell can be built as it will train (no sweep, or its pick is known)."""
        return self.sweep is None or cell_name(spec, regime) in self.tuning

    def sweep_units(self, only: list[str] | None = None) -> list[SweepUnit]:
        """One sweep per cell, named by the cell (``OUTPUT/sweep/<method>-<regime>.json``)."""
        return [SweepUnit(cell_name(s, r), s.method, s, r) for s, r in self.cells(only)]

    def cells(self, only: list[str] | None = None) -> list[tuple[MethodSpec, RegimeSpec]]:
        unknown = sorted(set(only or []) - {s.name for s in self.methods})
        if unknown:
            raise ValueError(f"--only names {unknown} are not in the config's methods {[s.name for s in self.methods]}")
        return [(s, r) for s in self.methods for r in self.regimes if not only or s.name in only]


class SweepUnit(NamedTuple):
    """What ``benchmarks.sweep.tune`` sweeps: one cell, under its cell name."""

    name: str
    method: str
    spec: MethodSpec
    regime: RegimeSpec


def check_kv_positions(cfg: TrainConfig, chunks: int) -> None:
    """A ValueError when a key-value document of ``chunks`` chunks and its query do not fit model.max_positions:
    c x m rows (gradmem, rmt) or c x (7N + 1) context tokens (full_context) before the query and target."""
    method = methods.get(cfg.memory.method)
    per_chunk = 7 * cfg.task.pairs + 1 if cfg.memory.method == "full_context" else cfg.memory.num_memory
    if method.name == "no_context":
        per_chunk = 0
    need = chunks * per_chunk + KV_READ_TOKENS - 1
    if need > cfg.model.max_positions:
        raise ValueError(f"a document of {chunks} chunks needs {need} positions for its READ ({chunks} x {per_chunk} "
                         f"prefix rows + {KV_READ_TOKENS - 1}), over model.max_positions = {cfg.model.max_positions}")


def cell_name(spec: MethodSpec, regime: RegimeSpec) -> str:
    return f"{spec.name}-{regime.name}"


def cell_fingerprint(cfg: ComposeConfig, spec: MethodSpec, regime: RegimeSpec) -> dict[str, Any]:
    """Everything that decides a cell's numbers: a finished cell is reused only if this is unchanged."""
    return jsonable({"train": cfg.cell_config(spec, regime).to_dict(), "eval_chunks": cfg.eval_chunks,
                     "eval_samples": cfg.eval_samples, "eval_seed": cfg.eval_seed, "test_split": cfg.test_split,
                     "latency_batch": cfg.latency_batch, "latency_repeats": cfg.latency_repeats,
                     "max_new_tokens": cfg.max_new_tokens})


# ---------------------------------------------------------------------------------------------- documents
def oracle_chunk(example: Example) -> int | None:
    """Index of the chunk that holds the answer, or None when it cannot be told. Key-value: the chunk containing the
    queried block opening ``!KK:`` (the query is ``?!KK:``; keys are distinct across a document, so one chunk)."""
    if not example.query.startswith("?!") or not example.query.endswith(":"):
        return None
    key = example.query[1:]  # "!KK:"
    found = [j for j, text in enumerate(example.chunks) if key in text]
    return found[0] if len(found) == 1 else None


def eval_documents(cfg: ComposeConfig, task_cfg: TaskConfig, c: int) -> tuple[list[Example], Any]:
    """``eval_samples`` held-out documents of c chunks and the task that collates them. Key-value: drawn from
    (eval_seed, c), disjoint from training's stream; bAbI: the first questions of ``test_split``, each story in
    c chunks of statements (fewer when it has fewer statements)."""
    if task_cfg.name == "kv":
        task = KVTask(pairs=task_cfg.pairs, chunks=(c, c))
        return task.examples(cfg.eval_samples, [cfg.eval_seed, c]), task
    split = build_task(dataclasses.replace(task_cfg, chunks=[1, 1]), cfg.test_split)
    assert isinstance(split, ExampleSet)
    return [split.chunked(k, c) for k in range(min(cfg.eval_samples, len(split)))], split


def collate_documents(task: Any, examples: Sequence[Example], tokenizer: Any) -> Batch:
    """A batch as the task's own training batches are built (bAbI: EOS after the target, unscored)."""
    if isinstance(task, ExampleSet):
        return task.collate(examples, tokenizer)
    return collate(examples, tokenizer, unscored=UNSCORED)


# ---------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def score_documents(reader: Reader, batch: Batch, oracle: list[int | None], steps: int, lr: float) -> dict[str, Any]:
    """Composed and oracle-chunk READ of one batch of documents, from one WRITE of all their chunks.

    The oracle READ takes the single memory of each document's answer chunk from the same write: a batched
    write gives every context the memory it gets alone, so this is the c = 1 READ of that chunk. Returns sums:
    ``em``, ``token_acc``, ``oracle_em`` (over ``oracle_n`` documents with a known chunk), ``rows``."""
    with attention_path(reader.lm, "sdpa"):
        out = methods.write(reader, batch.ctx_ids, batch.ctx_mask, steps, lr, mode="inference")
        read = read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask,
                                   out.lengths, batch.chunks)
        rows = methods.read_prefix(reader, out.memory, out.lengths)[1]  # (N,) rows of each memory
        starts = torch.cumsum(batch.chunks, 0) - batch.chunks  # (B,) each document's first memory
        known = [i for i, j in enumerate(oracle) if j is not None]
        oracle_em = 0.0
        if known:
            docs = torch.tensor(known, dtype=torch.long, device=batch.chunks.device)
            index = starts[docs] + torch.tensor([oracle[i] for i in known], dtype=torch.long, device=docs.device)
            lengths = None if out.lengths is None else out.lengths[index]
            single = read_teacher_forced(reader, out.memory[index], batch.read_ids[docs], batch.target_mask[docs],
                                         batch.score_mask[docs], lengths)
            oracle_em = float(single.exact_match.sum())
    document = torch.repeat_interleave(torch.arange(len(batch), device=rows.device), batch.chunks.to(rows.device))
    per_doc_rows = torch.zeros(len(batch), dtype=torch.long, device=rows.device).index_add_(0, document, rows.long())
    return {"em": float(read.exact_match.sum()), "token_acc": float(read.token_accuracy.sum()),
            "oracle_em": oracle_em, "oracle_n": len(known), "rows": float(per_doc_rows.sum()),
            "chunks": float(batch.chunks.sum())}


def measure_chunks(reader: Reader, task: Any, examples: list[Example], steps: int, lr: float,
                   batch_size: int) -> dict[str, Any]:
    """EM, oracle-chunk EM and prefix size over ``examples`` (documents of one c), batch by batch."""
    totals = {"em": 0.0, "token_acc": 0.0, "oracle_em": 0.0, "oracle_n": 0, "rows": 0.0, "chunks": 0.0}
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        batch = collate_documents(task, part, reader.tokenizer).to(reader.device)
        sums = score_documents(reader, batch, [oracle_chunk(e) for e in part], steps, lr)
        for key in totals:
            totals[key] += sums[key]
    n = len(examples)
    rows = totals["rows"] / n
    return {"documents": n, "mean_chunks": totals["chunks"] / n, "em": totals["em"] / n,
            "token_acc": totals["token_acc"] / n,
            "oracle_em": totals["oracle_em"] / totals["oracle_n"] if totals["oracle_n"] else None,
            "oracle_documents": totals["oracle_n"], "prefix_rows": rows,
            "prefix_bytes": rows * reader.d_model * reader.lm.get_input_embeddings().weight.element_size()}


@torch.no_grad()
def read_latencies(reader: Reader, documents: dict[int, tuple[Any, list[Example]]], steps: int, lr: float,
                   repeats: int, max_new_tokens: int) -> dict[int, dict[str, float]]:
    """Seconds per query of the composed READ for every c, on one batch of documents of c chunks each (written
    once beforehand): teacher-forced (``read_s_per_query``) and greedy answers through ``Reader.answer(...,
    chunks=)`` (``answer_s_per_query``). The c are timed round-robin, one call each per round after a warm-up
    round, and the median of ``repeats`` rounds kept: a machine whose speed drifts slows every c alike, so the
    ratios to c = 1 hold."""
    calls: dict[tuple[int, str], Any] = {}
    for c, (task, examples) in documents.items():
        batch = collate_documents(task, examples, reader.tokenizer).to(reader.device)
        with attention_path(reader.lm, "sdpa"):
            out = methods.write(reader, batch.ctx_ids, batch.ctx_mask, steps, lr, mode="inference")
        memories = reader.write([t for e in examples for t in e.chunks], steps=steps, lr=lr,
                                batch_size=len(batch.ctx_ids))

        def forced(batch: Batch = batch, out: Any = out) -> None:
            with attention_path(reader.lm, "sdpa"):
                read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask,
                                    out.lengths, batch.chunks)

        def answer(memories: Any = memories, examples: list[Example] = examples) -> None:
            reader.answer(memories, [e.query for e in examples], max_new_tokens=max_new_tokens,
                          batch_size=len(examples), chunks=[len(e.chunks) for e in examples])

        calls[(c, "read_s_per_query")], calls[(c, "answer_s_per_query")] = forced, answer
    times: dict[tuple[int, str], list[float]] = {key: [] for key in calls}
    for round_ in range(repeats + 1):  # round 0 warms up
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            if round_:
                times[key].append(time.perf_counter() - started)
    return {c: {kind: statistics.median(times[(c, kind)]) / len(documents[c][1])
                for kind in ("read_s_per_query", "answer_s_per_query")} for c in documents}


def measure(cfg: ComposeConfig, reader: Reader, train_cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Every c of ``eval_chunks``: EM, oracle EM and prefix size, then the READ latencies of all c side by side."""
    mem = train_cfg.memory
    batch_size = cfg.eval_batch_size or train_cfg.run.eval_batch_size
    was_training = reader.training
    reader.eval()
    try:
        by_c: dict[str, dict[str, Any]] = {}
        timing: dict[int, tuple[Any, list[Example]]] = {}
        for c in cfg.eval_chunks:
            examples, task = eval_documents(cfg, train_cfg.task, c)
            by_c[str(c)] = measure_chunks(reader, task, examples, mem.write_steps, mem.write_lr, batch_size)
            timing[c] = (task, examples[: cfg.latency_batch])
            logger.info("  c = %d: EM %.3f, oracle %s, %.0f prefix rows", c, by_c[str(c)]["em"],
                        "-" if by_c[str(c)]["oracle_em"] is None else f"{by_c[str(c)]['oracle_em']:.3f}",
                        by_c[str(c)]["prefix_rows"])
        for c, latency in read_latencies(reader, timing, mem.write_steps, mem.write_lr, cfg.latency_repeats,
                                         cfg.max_new_tokens).items():
            by_c[str(c)].update(latency)
    finally:
        reader.train(was_training)
    return by_c


# ---------------------------------------------------------------------------------------------- one cell
def run_cell(cfg: ComposeConfig, spec: MethodSpec, regime: RegimeSpec, output: Path, index: int, total: int,
             device: str = "cpu", command: list[str] | None = None) -> dict[str, Any]:
    """Train one (method, regime) reader (continuing from its checkpoint if one matches) and measure it by c."""
    name = cell_name(spec, regime)
    train_cfg = cfg.cell_config(spec, regime)
    run_dir = output / "runs" / name
    previous = run_dir / "config.yaml"
    if previous.exists() and TrainConfig.from_dict(yaml.safe_load(previous.read_text())).to_dict() != train_cfg.to_dict():
        logger.warning("%s: %s was trained with another config; starting it from scratch", name, run_dir)
        shutil.rmtree(run_dir)
    o, mem = train_cfg.optim, train_cfg.memory
    logger.info("cell %d/%d %s: training %d steps x batch %d on documents of %s chunks", index, total, name,
                o.max_steps, o.batch_size, regime.chunks)
    started = time.perf_counter()
    trainer = Trainer(train_cfg, run_dir, device=device)
    trainer.fit(resume=True)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    by_c = measure(cfg, trainer.reader, train_cfg)
    eval_s = time.perf_counter() - started
    curve = learning_curve(run_dir / "metrics.jsonl")
    step_times = [r["step_s"] for r in curve["train"] if r.get("step_s") is not None]
    return jsonable({
        "cell": name, "name": spec.name, "method": spec.method, "regime": regime.name,
        "chunks_trained": list(regime.chunks), "task": train_cfg.task.name,
        "k_train": mem.write_steps if spec.method in TRAINED_METHODS else None, "write_lr": mem.write_lr,
        "lr": o.lr,
        "num_memory": mem.num_memory, "hidden_size": trainer.reader.d_model,
        "budget": {"max_steps": o.max_steps, "batch_size": o.batch_size, "trained_steps": trainer.step},
        "stopped": trainer.stopped, "selected": trainer.best_record(),
        "by_c": by_c, "validation": curve["eval"],
        "train_wall_s": train_s, "eval_wall_s": eval_s, "command": command, "device": device_name(device),
        "seconds_per_step": sum(step_times) / len(step_times) if step_times else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cell_config": cell_fingerprint(cfg, spec, regime),
    })


# ---------------------------------------------------------------------------------------------- the grid
def finished_cells(cfg: ComposeConfig, output: Path) -> dict[str, dict[str, Any]]:
    """The cells on disk (this process's or another's); one produced by another config is an error."""
    import json

    cells = {}
    for spec, regime in cfg.cells():
        path = output / "cells" / f"{cell_name(spec, regime)}.json"
        if not path.exists() or not cfg.tuned_ready(spec, regime):
            continue
        done = json.loads(path.read_text())
        if not same_cell_config(done.get("cell_config"), cell_fingerprint(cfg, spec, regime)):
            raise ValueError(f"{path} was produced by a different config than this one; use another --output or "
                             f"delete that file to retrain the cell")
        cells[cell_name(spec, regime)] = done
    return cells


def run_compose(cfg: ComposeConfig, output: str | os.PathLike, only: list[str] | None = None,
                max_steps: int | None = None, command: list[str] | None = None,
                repo_root: str | os.PathLike | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train and measure every selected cell not already finished under ``output``. Returns results.json's dict.
    ``max_steps`` overrides every method's budget (smoke runs); it is part of the cells' config."""
    cfg = cfg.with_max_steps(max_steps)
    output = Path(output)
    (output / "cells").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cfg.sweep is not None:
        units = cfg.sweep_units()
        mine = [u.name for u in cfg.sweep_units(only)]
        cfg = cfg.with_tuning(tune(units, cfg.sweep, output, lambda u: cfg.cell_config(u.spec, u.regime, tuned=False),
                                   only=mine, device=device))
    selected = [(s, r) for s, r in cfg.cells(only) if cfg.tuned_ready(s, r)]
    done = finished_cells(cfg, output)
    todo = [(s, r) for s, r in selected if cell_name(s, r) not in done]
    if len(todo) < len(selected):
        logger.info("resuming: skipping finished %s", ", ".join(cell_name(s, r) for s, r in selected
                                                                 if cell_name(s, r) in done))
    meta = {"command": command, "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "device": device_name(device), **git_commit(Path(repo_root) if repo_root else Path.cwd())}
    for i, (spec, regime) in enumerate(todo, start=1):
        cell = run_cell(cfg, spec, regime, output, i, len(todo), device=device, command=command)
        cell.update(commit=meta["commit"], dirty=meta["dirty"])
        write_json_atomic(output / "cells" / f"{cell['cell']}.json", cell)
        shutil.rmtree(output / "runs" / cell["cell"] / "checkpoints", ignore_errors=True)  # reader/ stays
        logger.info("cell %d/%d %s done | elapsed %.0fs", i, len(todo), cell["cell"], time.perf_counter() - started)
        write_results(cfg, output, {**meta, "wall_time_s": time.perf_counter() - started})
    return write_results(cfg, output, {**meta, "wall_time_s": time.perf_counter() - started})


def write_results(cfg: ComposeConfig, output: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """results.json, results.md and compose.png from every finished cell on disk (each replaced atomically)."""
    cells = finished_cells(cfg, output)
    ordered = [cells[cell_name(s, r)] for s, r in cfg.cells() if cell_name(s, r) in cells]
    summary = jsonable({
        **meta, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cells_wall_s": sum(c["train_wall_s"] + c["eval_wall_s"] for c in ordered),
        "complete": len(ordered) == len(cfg.cells()), "config": cfg.to_dict(), "cells": ordered,
        "sweep": {u.name: r for u in cfg.sweep_units() if (r := sweep_record(output, u.name)) is not None},
    })
    write_json_atomic(output / "results.json", summary)
    write_atomic(output / "results.md", render_markdown(cfg, summary))
    plot(cfg, summary, output / "compose.png")
    return summary


# ---------------------------------------------------------------------------------------------- reports
def row_label(cell: dict[str, Any]) -> str:
    return f"{cell['name']} / {cell['regime']} {cell['chunks_trained']}"


def ratio(cell: dict[str, Any], c: int, key: str) -> str:
    base, here = cell["by_c"].get("1", {}).get(key), cell["by_c"].get(str(c), {}).get(key)
    return f"{here / base:.2f}" if base and here is not None else "-"


def gain_section(cfg: ComposeConfig, cells: list[dict[str, Any]]) -> list[str]:
    """What training with composition buys: each later regime's EM minus the first regime's (points), per method
    and c; the first regime is the config's first (memories trained one at a time, e.g. [1, 1])."""
    if len(cfg.regimes) < 2:
        return []
    base, cs = cfg.regimes[0].name, cfg.eval_chunks
    by_name = {(c["name"], c["regime"]): c for c in cells}
    lines = ["", f"## What training with composition buys: EM points over regime {base} "
             f"{cfg.regimes[0].chunks} at the same c", "",
             "| method: regime vs " + base + " | " + " | ".join(f"c = {c}" for c in cs) + " |", "|---|" + "---|" * len(cs)]
    for spec in cfg.methods:
        for regime in cfg.regimes[1:]:
            one, other = by_name.get((spec.name, base)), by_name.get((spec.name, regime.name))
            if one is None or other is None:
                continue
            diffs = []
            for k in cs:
                a, b = one["by_c"].get(str(k), {}).get("em"), other["by_c"].get(str(k), {}).get("em")
                diffs.append("-" if a is None or b is None else f"{100 * (b - a):+.1f}")
            lines.append(f"| {spec.name}: {regime.name} vs {base} | " + " | ".join(diffs) + " |")
    return lines


def render_markdown(cfg: ComposeConfig, summary: dict[str, Any]) -> str:
    cells, cs = summary["cells"], cfg.eval_chunks
    first = cfg.cell_config(*cfg.cells()[0])
    m = first.model
    task = (f"key-value retrieval, N = {first.task.pairs} pairs per chunk" if first.task.name == "kv" else
            f"bAbI {'+'.join(first.task.tasks)} ({first.task.babi_set}), stories split into chunks of statements")
    status = "complete" if summary["complete"] else f"INCOMPLETE: {len(cells)}/{len(cfg.cells())} cells"
    commands = list(dict.fromkeys(" ".join(c["command"]) for c in cells if c.get("command")))
    head = "| method / regime [chunks trained] | " + " | ".join(f"c = {c}" for c in cs) + " |"
    rule = "|---|" + "---|" * len(cs)
    lines = [
        f"# Composed READ: EM against the number of chunks c ({task})",
        "",
        f"- {status}; cells by: " + ("; ".join(f"`{c}`" for c in commands) or "-")
        + f"; this report by: `{' '.join(summary.get('command') or []) or '-'}`",
        f"- commit: {summary.get('commit') or '-'}{' (with uncommitted changes)' if summary.get('dirty') else ''}",
        (f"- wall time: {summary['cells_wall_s']:.0f} s over all cells (this process {summary.get('wall_time_s', 0):.0f}"
         f" s); {summary.get('device', '-')}, {summary.get('threads', '-')} torch threads, "
         f"torch {summary['torch_version']}"),
        (f"- backbone: {m.arch}, {m.num_layers} layers, d = {m.hidden_size}, max_positions {m.max_positions}, "
         f"from scratch; memory {first.memory.num_memory} vectors per chunk (gradmem, rmt); "
         f"{cfg.eval_samples} held-out documents per c"),
        "",
        "## Teacher-forced EM (%) of the composed READ, by c (full_context: the whole document, the bound)",
        "", head, rule,
    ]
    lines += [f"| {row_label(c)} | " + " | ".join(pct(c["by_c"].get(str(k), {}).get("em")) for k in cs) + " |"
              for c in cells]
    if cells and first.task.name != "kv":  # a story has at most one chunk per statement: say how many there were
        lines.append("| (mean chunks per document) | " + " | ".join(
            f"{cells[0]['by_c'][str(k)]['mean_chunks']:.2f}" if str(k) in cells[0]["by_c"] else "-" for k in cs) + " |")
    lines += gain_section(cfg, cells)
    lines += ["", "## Oracle chunk: EM (%) of the READ given only the memory of the chunk holding the answer", "",
              head, rule]
    lines += [f"| {row_label(c)} | " + " | ".join(pct(c["by_c"].get(str(k), {}).get("oracle_em")) for k in cs) + " |"
              for c in cells]
    lines += ["", "## What composition costs at READ: ratio to c = 1 of the seconds per query "
              "(teacher-forced READ / greedy answer) and the prefix rows per query", "",
              "| method / regime [chunks trained] | READ ms / query at c = 1 | answer ms / query at c = 1 | "
              + " | ".join(f"c = {c}" for c in cs[1:]) + " |", "|---|---|---|" + "---|" * len(cs[1:])]
    for c in cells:
        one = c["by_c"].get("1", {})
        lines.append(f"| {row_label(c)} | {1e3 * one.get('read_s_per_query', 0):.2f} | "
                     f"{1e3 * one.get('answer_s_per_query', 0):.2f} | "
                     + " | ".join(f"{ratio(c, k, 'read_s_per_query')} / {ratio(c, k, 'answer_s_per_query')} / "
                                  f"{c['by_c'].get(str(k), {}).get('prefix_rows', 0):.0f} rows" for k in cs[1:]) + " |")
    lines += ["", "## Training", "", "| method / regime [chunks trained] | K train | lr / alpha | budget | trained steps | "
              "selected step (validation EM) | stopped | s / step | train s | measure s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        sel = c.get("selected") or {}
        sps = f"{c['seconds_per_step']:.3f}" if c.get("seconds_per_step") else "-"
        lines.append(f"| {row_label(c)} | {c['k_train'] if c['k_train'] is not None else '-'} | "
                     f"{c.get('lr', '-')} / {c['write_lr'] if c['k_train'] is not None else '-'} | "
                     f"{c['budget']['max_steps']} x {c['budget']['batch_size']} | {c['budget']['trained_steps']} | "
                     f"{sel.get('step', '-')} ({pct(sel.get('em'))}) | {c.get('stopped') or '-'} | {sps} | "
                     f"{c['train_wall_s']:.0f} | {c['eval_wall_s']:.0f} |")
    lines += sweep_section(summary.get("sweep") or {})
    if first.task.name == "babi":
        lines += ["", "bAbI: no oracle chunk (the examples do not say which statements support the answer); a story "
                  "with fewer statements than c has fewer chunks (the mean is in results.json, `mean_chunks`)."]
    return "\n".join(lines) + "\n"


def plot(cfg: ComposeConfig, summary: dict[str, Any], path: Path) -> None:
    """Two panels: EM vs c (composed: solid, one line per method x regime; oracle chunk and full context dashed)
    and the teacher-forced READ's seconds per query vs c as a ratio to c = 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, cs = summary["cells"], cfg.eval_chunks
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = ["o", "s", "^", "v", "D", "P"]
    for i, c in enumerate(cells):
        xs = [k for k in cs if str(k) in c["by_c"]]
        bound = c["method"] not in TRAINED_METHODS
        line, = left.plot(xs, [100 * c["by_c"][str(k)]["em"] for k in xs], marker=markers[i % len(markers)],
                          linestyle="--" if bound else "-", markersize=4, label=row_label(c))
        oracle = [(k, c["by_c"][str(k)]["oracle_em"]) for k in xs if c["by_c"][str(k)].get("oracle_em") is not None]
        if oracle and not bound:
            left.plot([k for k, _ in oracle], [100 * v for _, v in oracle], linestyle=":", color=line.get_color(),
                      label=f"{row_label(c)} oracle chunk")
        base = c["by_c"].get("1", {}).get("read_s_per_query")
        if base:
            right.plot(xs, [c["by_c"][str(k)]["read_s_per_query"] / base for k in xs], marker=markers[i % len(markers)],
                       linestyle="--" if bound else "-", markersize=4, color=line.get_color(), label=row_label(c))
    left.set_xlabel("chunks per document c")
    left.set_ylabel("exact match % (teacher-forced)")
    left.set_ylim(-3, 103)
    left.set_title("EM vs c (dashed: full context; dotted: oracle chunk)", fontsize=10)
    left.legend(fontsize=6)
    right.set_xlabel("chunks per document c")
    right.set_ylabel("READ seconds per query / at c = 1")
    right.set_title("READ latency vs c", fontsize=10)
    right.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- command line
def load_config(path: str, only: list[str] | None) -> ComposeConfig:
    """The config at ``path``, with ``only`` checked against its methods (ValueError)."""
    cfg = ComposeConfig.from_yaml(path)
    cfg.cells(only)
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.grid_main("compose", __doc__, "benchmarks/configs/compose_*.yaml", load_config, run_compose, argv)


if __name__ == "__main__":
    main()
