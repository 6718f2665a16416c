"""The capacity benchmark: how many key-value pairs each method's memory holds (issue 3).

    # seconds: the test's configuration (tiny model, N = 1 and 2)
    python -m benchmarks.capacity --config benchmarks/configs/capacity_smoke.yaml --output runs/capacity_smoke --threads 1

    # the CPU configuration (estimated wall time in the YAML's header; 2 cores)
    python -m benchmarks.capacity --config benchmarks/configs/capacity_cpu.yaml --output runs/capacity_cpu --threads 1

    # the paper's cells (8 vectors of 128, N = 16 and 32) on a GPU
    python -m benchmarks.capacity --config benchmarks/configs/capacity_paper_gpu.yaml --output runs/capacity_paper_gpu

    # a quick end-to-end check of any configuration: every cell with 20 training steps
    python -m benchmarks.capacity --config benchmarks/configs/capacity_cpu.yaml --output /tmp/cap_check --max-steps 20

A partial table while cells still train elsewhere: the same command with --report-only (trains nothing).
``--only gradmem_k1,gradmem_k2``: these methods' cells only; processes with disjoint lists can share one --output.
Interrupted? Run the same command again (see Resume below); the table is printed at the end.

For every (method, N) cell of a ``CapacityConfig`` the same backbone (architecture and init seed) is trained
on key-value retrieval with N pairs through the ordinary ``Trainer`` with the same training budget, then
evaluated on held-out samples with every WRITE step count in ``eval_steps`` (gradmem and rmt; the bounds once).

Output directory::

    cells/<method>_N<N>.json    one finished cell, written atomically the moment it finishes
    runs/<method>_N<N>/         the cell's Trainer directory (metrics.jsonl, reader/; checkpoints while training)
    results.json                all cells + config + git commit + wall time + torch version (after every cell)
    results.md                  the tables, with the paper's figures beside ours
    capacity.png                EM vs N per method; EM vs K_eval per trained method at the largest N

Resume: a cell whose json exists is skipped (its config must equal the current one, else we refuse rather
than mix two configurations in one table). A cell that was interrupted while training continues from its
Trainer's latest checkpoint (``run.save_every``) with the same step, optimizer and data; one interrupted while
evaluating re-evaluates. A run directory left by a different cell config is wiped and trained from scratch.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from benchmarks import common
from benchmarks.common import (deep_merge, pct, device_name, git_commit, jsonable, save_figure, write_atomic,
                               write_json_atomic)
from benchmarks.sweep import SweepConfig, run_sweep, sweep_record, sweep_section, tune
from benchmarks.sweep import apply as sweep_apply
from gradmem.config import METHODS, ConfigError, declared, from_dict, known_method, override, to_dict
from gradmem.train import TrainConfig, Trainer, evaluate

logger = logging.getLogger(__name__)

TRAINED_METHODS = ("gradmem", "rmt")  # methods whose WRITE has a step count worth sweeping at evaluation
BASE_SECTIONS = ("model", "memory", "task", "optim", "run")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ---------------------------------------------------------------------------------------------- the paper
# Exact match % from the paper (key-value retrieval, 8 memory vectors of 128), verbatim with their
# "~". Key: (method, K trained, N) -> {K_eval: EM, "best": best over K_eval 0..30}. Bounds have K trained None
# and a single figure under K_eval None. The first table's "GradMem K=5" column is read as trained and
# evaluated with K = 5 (its N = 96 figure, 88.4, is the K train 5 / K eval 5 entry of the second table).
PAPER_EM: dict[tuple[str, int | None, int], dict[int | str | None, str]] = {
    ("full_context", None, 16): {None: "~100"},
    ("full_context", None, 32): {None: "~100"},
    ("full_context", None, 64): {None: "~96.3"},
    ("full_context", None, 96): {None: "~98.7"},
    ("rmt", 1, 16): {1: "45.5"},
    ("rmt", 1, 32): {1: "44.2"},
    ("rmt", 1, 64): {1: "19.3"},
    ("rmt", 1, 96): {1: "12.9"},
    ("gradmem", 1, 16): {1: "~96.4"},
    ("gradmem", 1, 32): {1: "86.9", 2: "92.3", 3: "96.7", 4: "97.7", 5: "98.1", "best": "98.3"},
    ("gradmem", 1, 64): {1: "58.6"},
    ("gradmem", 1, 96): {1: "~32.6"},
    ("gradmem", 2, 32): {1: "65.1", 2: "98.2", 3: "99.2", 4: "99.7", 5: "99.6", "best": "99.8"},
    ("gradmem", 2, 64): {1: "31.8", 2: "72.8", 3: "81.5", 4: "89.9", 5: "89.9", "best": "93.9"},
    ("gradmem", 5, 16): {5: "~100"},
    ("gradmem", 5, 32): {5: "~99.8"},
    ("gradmem", 5, 64): {5: "~99.1"},
    ("gradmem", 5, 96): {1: "8.6", 2: "22.3", 3: "39.8", 4: "62.0", 5: "88.4", "best": "95.8"},
}


def paper_figure(method: str, k_train: int | None, pairs: int, k_eval: int | str | None) -> str | None:
    """The paper's EM % for this cell and K_eval (``"best"``: best over K_eval), or None where it gives none.

    The paper's memory is 8 vectors of 128; a figure is shown beside ours whatever our m and d are, so the
    reader must check the config before comparing."""
    figures = PAPER_EM.get((method, k_train if method in TRAINED_METHODS else None, pairs), {})
    return figures.get(k_eval if method in TRAINED_METHODS else None)


# ---------------------------------------------------------------------------------------------- configs
# Declared like every config of the project (gradmem.config.declared): frozen, validated when built (from YAML,
# from keywords, or as a copy by gradmem.config.override / dataclasses.replace), unknown keys refused. A benchmark
# config checks every cell's TrainConfig when it is built, so a bad grid fails before any training.


@declared
class MethodSpec:
    """One row of the benchmark: a named method with its training WRITE steps and optional overrides.

    ``write_lr`` may be one value or (capacity) a mapping N -> value (the paper's alpha depends on N).
    ``max_steps`` and ``overrides`` (nested TrainConfig sections, e.g. ``{optim: {lr: 0.001}}``) change this
    method's cells only; a budget that differs between methods is logged as a warning, since the comparison
    assumes equal budgets."""

    name: str = Field(description="names the method's files: letters, digits, '_', '.', '-'")
    method: str = Field(description=f"one of {METHODS}")
    write_steps: int | None = Field(None, ge=0, description="K trained; None: the base memory.write_steps "
                                                            "(irrelevant for the bounds)")
    write_lr: float | dict[int, float] | None = Field(None, description="alpha, or N -> alpha; None: the base "
                                                                        "memory.write_lr")
    max_steps: int | None = Field(None, ge=0, description="None: the base optim.max_steps")
    overrides: dict[str, Any] = Field(default_factory=dict, description="TrainConfig sections for this method's "
                                                                        "cells only")

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"method name {value!r} must be letters, digits, '_', '.', '-' (it names files)")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return known_method(value)

    @field_validator("write_lr")
    @classmethod
    def _positive_alpha(cls, value: float | dict[int, float] | None) -> float | dict[int, float] | None:
        alphas = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(not alpha > 0 for alpha in alphas):
            raise ValueError(f"alpha must be > 0, got {value!r}")
        return value

    @property
    def trained_steps(self) -> bool:
        """Whether the WRITE step count means anything for this method (gradmem, rmt)."""
        return self.method in TRAINED_METHODS


def method_sections(base: dict[str, Any], spec: MethodSpec, write_lr: float | None) -> dict[str, Any]:
    """TrainConfig sections of one method: ``base``, then its overrides, then its method, K, alpha and budget."""
    data = deep_merge(base, spec.overrides)
    memory = data.setdefault("memory", {})
    memory["method"] = spec.method
    if spec.write_steps is not None:
        memory["write_steps"] = spec.write_steps
    if write_lr is not None:
        memory["write_lr"] = write_lr
    if spec.max_steps is not None:
        data["optim"] = {**(data.get("optim") or {}), "max_steps": spec.max_steps}
    return data


def _section(name: str) -> Any:
    return Field(None, description=f"TrainConfig section {name!r} shared by every method (gradmem.train)")


@declared
class BenchmarkConfig:
    """What the capacity and comparison configs share: the TrainConfig sections (``model``, ``memory``, ``task``,
    ``optim``, ``run``: mappings, validated cell by cell once each method's changes are merged in) sit at the top
    level beside the grid's keys; ``methods`` is a list of MethodSpec."""

    model: dict[str, Any] | None = _section("model")
    memory: dict[str, Any] | None = _section("memory")
    task: dict[str, Any] | None = _section("task")
    optim: dict[str, Any] | None = _section("optim")
    run: dict[str, Any] | None = _section("run")
    methods: list[MethodSpec] = Field(default_factory=list, validate_default=True,
                                      description="the rows: {name, method, write_steps, write_lr, max_steps, overrides}")
    sweep: SweepConfig | None = Field(None, description="learning rate (and GradMem alpha) per method, picked on "
                                                        "validation (benchmarks.sweep)")
    # Method name -> the candidate its sweep picked: set by the run from the sweep records (with_tuning), never
    # by the YAML. The cells train with it.
    tuning: dict[str, dict[str, float]] = Field(default_factory=dict, description="set from the sweep records")

    @field_validator("methods")
    @classmethod
    def _methods(cls, specs: list[MethodSpec]) -> list[MethodSpec]:
        if not specs:
            raise ValueError("the config needs at least one entry under `methods:` ({name, method, write_steps, ...})")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        return specs

    @classmethod
    def from_dict(cls, data: Any):
        if isinstance(data, Mapping) and "tuning" in data:
            raise ConfigError(cls, "tuning: set from the sweep records by the run, not by the config")
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike):
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    @property
    def base(self) -> dict[str, Any]:
        """The TrainConfig sections the config gives (a copy)."""
        return {k: copy.deepcopy(getattr(self, k)) for k in BASE_SECTIONS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The config as its YAML would say it (base sections at the top level; no tuning)."""
        data = to_dict(self)
        del data["tuning"]
        return {**self.base, **{k: v for k, v in data.items() if k not in BASE_SECTIONS}}

    def with_max_steps(self, max_steps: int | None):
        """A validated copy in which every method trains ``max_steps`` steps, and every sweep candidate at most as
        many (smoke runs); ``self`` when None."""
        if max_steps is None:
            return self
        changes: dict[str, Any] = {"methods": [{**asdict(spec), "max_steps": max_steps} for spec in self.methods]}
        if self.sweep is not None:
            changes["sweep"] = {**asdict(self.sweep), "max_steps": min(self.sweep.max_steps, max_steps)}
        return override(self, changes)

    def with_tuning(self, tuning: dict[str, dict[str, float]]):
        """A validated copy whose cells train with the sweep's picks (method name -> candidate)."""
        return override(self, {"tuning": tuning})


@declared
class CapacityConfig(BenchmarkConfig):
    """A base TrainConfig (its sections at the top level) and the grid of methods x pairs to run."""

    pairs: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, validate_default=True,
                                                     description="the pair counts N (distinct), in order")
    eval_steps: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [1, 2], min_length=1,
                                                          description="K_eval of gradmem and rmt (the trained K always)")
    eval_samples: int = Field(1000, ge=1, description="held-out samples per cell and K_eval")
    eval_batch_size: int | None = Field(None, ge=1, description="None: the base run.eval_batch_size")
    eval_seed: int = Field(0, description="held-out stream: evaluation batches come from "
                                          "('capacity-eval', eval_seed, N, i)")
    # Warm start each method's cell at N from its own reader at the previous N of ``pairs`` (the authors' curriculum
    # for large N); the same for every method. A cell's validation selection and stopping are its Trainer's.
    curriculum: bool = Field(False, description="warm start each cell from the same method's reader at the previous N")

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, pairs: list[int]) -> list[int]:
        if not pairs:
            raise ValueError("capacity config needs `pairs:`, a non-empty list of pair counts N (e.g. [2, 4])")
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"pairs must be distinct positive integers, got {pairs}")
        return pairs

    @model_validator(mode="after")
    def _grid(self) -> "CapacityConfig":
        """Fail before any training: the grid agrees with itself, then every cell's TrainConfig is built here."""
        problems = []
        for i, spec in enumerate(self.methods):
            if isinstance(spec.write_lr, dict):
                missing = sorted(set(self.pairs) - set(spec.write_lr))
                if missing:
                    problems.append(f"methods.{i}.write_lr: {spec.name!r} has no value for N = {missing}")
        if self.sweep is not None and self.sweep.pairs is not None and self.sweep.pairs not in self.pairs:
            problems.append(f"sweep.pairs: {self.sweep.pairs} must be one of pairs {self.pairs}")
        if problems:
            raise ValueError("; ".join(problems))
        for spec, pairs in self.cells():
            try:
                cfg = self.cell_config(spec, pairs)
            except ValueError as exc:
                raise ValueError(f"cell {cell_name(spec, pairs)}: {exc}") from None
            if cfg.task.name != "kv":
                raise ValueError(f"task.name: the capacity benchmark runs on the key-value task (task.name: kv), "
                                 f"got {cfg.task.name!r}")
            longest = 2 * cfg.memory.num_memory + 7 * pairs + 1 + 9  # RMT's [M; C; M], or [M; Q; Y] + slack
            if longest > cfg.model.max_positions or 7 * pairs + 1 > cfg.memory.max_context_tokens:
                raise ValueError(f"cell {cell_name(spec, pairs)}: N = {pairs} needs model.max_positions >= {longest} "
                                 f"and memory.max_context_tokens >= {7 * pairs + 1}; got {cfg.model.max_positions}, "
                                 f"{cfg.memory.max_context_tokens}")
        return self

    # -- the cells
    def cell_config(self, spec: MethodSpec, pairs: int, output: Path | None = None, tuned: bool = True) -> TrainConfig:
        """The TrainConfig of one cell: base, then the method's overrides, then its method, K, alpha, budget, N.

        With ``curriculum`` the cell warm-starts from the same method's reader at the previous N; that reader lives
        under ``output`` (``runs/<method>_N<prev>/reader``; a placeholder path when no output is given). ``tuned``:
        with the lr and alpha its sweep picked, when known."""
        data = method_sections(self.base, spec, spec.write_lr[pairs] if isinstance(spec.write_lr, dict) else spec.write_lr)
        data["task"] = {**(data.get("task") or {}), "pairs": pairs}
        previous = self.previous_pairs(pairs)
        if previous is not None:
            root = Path(output) if output is not None else Path("OUTPUT")
            data["model"] = {**(data.get("model") or {}), "warm_start": str(root / "runs" / cell_name(spec, previous) / "reader")}
        cfg = TrainConfig.from_dict(data)
        pick = self.tuning.get(self.sweep_name(spec, pairs))
        return sweep_apply(cfg, pick) if tuned and pick is not None else cfg

    def sweep_pairs(self) -> int:
        """The N the sweep's candidates train at (one sweep per method)."""
        return self.sweep.pairs if self.sweep and self.sweep.pairs is not None else min(self.pairs)

    def per_pairs(self) -> bool:
        """Whether every (method, N) cell is swept on its own (``sweep.per_pairs``) rather than once per method."""
        return self.sweep is not None and self.sweep.per_pairs

    def sweep_name(self, spec: MethodSpec, pairs: int) -> str:
        """The sweep record that tunes a cell: the cell's own (per_pairs) or its method's."""
        return cell_name(spec, pairs) if self.per_pairs() else spec.name

    def sweep_names(self) -> list[str]:
        return [cell_name(s, n) for s, n in self.cells()] if self.per_pairs() else [s.name for s in self.methods]

    def tuned_ready(self, spec: MethodSpec, pairs: int) -> bool:
        """Whether this cell can be built as it will train (no sweep, or its pick is known)."""
        return self.sweep is None or self.sweep_name(spec, pairs) in self.tuning

    def previous_pairs(self, pairs: int) -> int | None:
        """The N a curriculum cell at ``pairs`` starts from (None: from scratch)."""
        index = self.pairs.index(pairs)
        return self.pairs[index - 1] if self.curriculum and index > 0 else None

    def eval_steps_for(self, spec: MethodSpec, cfg: TrainConfig) -> list[int]:
        """K_eval list of a cell: the sweep (plus the trained K) for gradmem/rmt; the trained K alone for the bounds
        (their WRITE ignores K, so one evaluation says everything)."""
        if not spec.trained_steps:
            return [cfg.memory.write_steps]
        return sorted(set(self.eval_steps) | {cfg.memory.write_steps})

    def cells(self, only: list[str] | None = None) -> list[tuple[MethodSpec, int]]:
        """N-major order: every method at the smallest N first, so a partial table is already a comparison (and a
        curriculum cell comes after the cell it starts from). ``only``: these method names."""
        if only:
            unknown = sorted(set(only) - {s.name for s in self.methods})
            if unknown:
                raise ValueError(f"--only names {unknown} are not in the config's methods {[s.name for s in self.methods]}")
        return [(spec, pairs) for pairs in self.pairs for spec in self.methods if not only or spec.name in only]


def cell_name(spec: MethodSpec, pairs: int) -> str:
    return f"{spec.name}_N{pairs}"


# ---------------------------------------------------------------------------------------------- one cell
def run_cell(cfg: CapacityConfig, spec: MethodSpec, pairs: int, output: Path, index: int, total: int,
             device: str = "cpu") -> dict[str, Any]:
    """Train one (method, N) cell (continuing from its Trainer checkpoint if one matches), evaluate, return its result."""
    name = cell_name(spec, pairs)
    train_cfg = cfg.cell_config(spec, pairs, output)
    if train_cfg.model.warm_start and not Path(train_cfg.model.warm_start).is_dir():
        raise ValueError(f"cell {name} warm-starts from {train_cfg.model.warm_start}, which is not there yet: run the "
                         f"previous N of this method first (cells run in N order)")
    run_dir = output / "runs" / name
    resolved = train_cfg.to_dict()
    previous = run_dir / "config.yaml"
    if previous.exists() and TrainConfig.from_dict(yaml.safe_load(previous.read_text())).to_dict() != resolved:
        logger.warning("cell %s: %s was trained with another config; starting it from scratch", name, run_dir)
        shutil.rmtree(run_dir)
    o = train_cfg.optim
    logger.info("cell %d/%d %s (method %s, K train %s, write lr %g, N %d): training %d steps x batch %d = %d samples, "
                "model seed %d, data seed %d", index, total, name, spec.method,
                train_cfg.memory.write_steps if spec.trained_steps else "-", train_cfg.memory.write_lr, pairs,
                o.max_steps, o.batch_size, o.max_steps * o.batch_size, train_cfg.model.seed, o.seed)
    started = time.perf_counter()
    trainer = Trainer(train_cfg, run_dir, device=device)
    trainer.fit(resume=True)
    train_s = time.perf_counter() - started

    steps = cfg.eval_steps_for(spec, train_cfg)
    logger.info("cell %d/%d %s: evaluating K_eval %s on %d held-out samples", index, total, name, steps, cfg.eval_samples)
    started = time.perf_counter()
    batch_size = cfg.eval_batch_size or train_cfg.run.eval_batch_size
    scores = evaluate(trainer.reader, trainer.eval_task, cfg.eval_samples, steps, train_cfg.memory.write_lr,
                      seed=["capacity-eval", cfg.eval_seed, pairs], batch_size=batch_size)
    eval_s = time.perf_counter() - started

    k_train = train_cfg.memory.write_steps if spec.trained_steps else None
    trained_em = scores[train_cfg.memory.write_steps]["em"]
    best_k = max(steps, key=lambda k: (scores[k]["em"], -k))  # ties go to the fewer steps
    cell = {
        "cell": name, "name": spec.name, "method": spec.method, "pairs": pairs, "k_train": k_train,
        "write_lr": train_cfg.memory.write_lr, "num_memory": train_cfg.memory.num_memory,
        "hidden_size": train_cfg.model.hidden_size,
        "budget": {"max_steps": o.max_steps, "batch_size": o.batch_size, "train_samples": o.max_steps * o.batch_size,
                   "max_seconds": train_cfg.run.max_seconds, "trained_steps": trainer.step},
        "stopped": trainer.stopped, "selected": trainer.best_record(),  # validation-selected step, never test
        "warm_start_from": cell_name(spec, cfg.previous_pairs(pairs)) if cfg.previous_pairs(pairs) else None,
        "curve": validation_curve(run_dir),
        "em_trained": trained_em, "best_k_eval": best_k, "em_best": scores[best_k]["em"],
        "eval": {str(k): scores[k] for k in steps}, "eval_samples": cfg.eval_samples,
        "paper": {"trained": paper_figure(spec.method, k_train, pairs, k_train),
                  "best": paper_figure(spec.method, k_train, pairs, "best"),
                  "k_eval": {str(k): paper_figure(spec.method, k_train, pairs, k) for k in steps}},
        "train_wall_s": train_s, "eval_wall_s": eval_s,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cell_config": cell_fingerprint(cfg, spec, pairs),
    }
    return jsonable(cell)


def validation_curve(run_dir: Path) -> list[dict[str, float]]:
    """The cell's validation evaluations (step, EM, token accuracy) from its Trainer log."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": e["step"], "em": e["em"], "token_acc": e["token_acc"]} for e in events if e.get("event") == "eval"]


def cell_fingerprint(cfg: CapacityConfig, spec: MethodSpec, pairs: int) -> dict[str, Any]:
    """Everything that decides a cell's numbers: a finished cell is reused only if this is unchanged."""
    train_cfg = cfg.cell_config(spec, pairs)
    return jsonable({"train": train_cfg.to_dict(), "eval_steps": cfg.eval_steps_for(spec, train_cfg),
                     "eval_samples": cfg.eval_samples, "eval_seed": cfg.eval_seed})


def same_cell_config(stored: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether a finished cell's recorded config is the current one. The recorded TrainConfig is read back through
    today's dataclasses first, so a config field added since (with a default that keeps the old behaviour) does
    not invalidate finished cells; any value that differs does."""
    if not isinstance(stored, dict) or not isinstance(stored.get("train"), dict):
        return False
    try:
        train = TrainConfig.from_dict(stored["train"]).to_dict()
    except (TypeError, ValueError):
        return False
    return jsonable({**stored, "train": train}) == current


# ---------------------------------------------------------------------------------------------- the grid
def finished_cells(cfg: CapacityConfig, output: Path) -> dict[str, dict[str, Any]]:
    """The cells already finished under ``output`` (by this process or another one working on other methods)."""
    results = {}
    for spec, pairs in cfg.cells():
        if not cfg.tuned_ready(spec, pairs):  # its sweep has not picked yet, so the cell cannot be finished
            continue
        path = output / "cells" / f"{cell_name(spec, pairs)}.json"
        if path.exists():
            done = json.loads(path.read_text())
            if not same_cell_config(done.get("cell_config"), cell_fingerprint(cfg, spec, pairs)):
                raise ValueError(f"{path} was produced by a different config than this one; use another --output "
                                 f"or delete that file to retrain the cell")
            results[cell_name(spec, pairs)] = done
    return results


def run_capacity(cfg: CapacityConfig, output: str | os.PathLike, max_steps: int | None = None,
                 command: list[str] | None = None, repo_root: str | os.PathLike | None = None,
                 device: str = "cpu", only: list[str] | None = None, report_only: bool = False) -> dict[str, Any]:
    """Run every cell not already finished under ``output``; write the results after each. Returns results.json's dict.

    ``max_steps`` overrides every method's training budget (smoke runs); it is part of the cells' config, so
    cells finished with another budget are refused rather than mixed in. ``only``: run these methods' cells (several
    processes with disjoint lists may share one output: each writes its cells, and the results cover every finished
    cell found there). ``report_only``: run no sweep and train no cell, only write the results of what is finished."""
    cfg = cfg.with_max_steps(max_steps)
    output = Path(output)
    (output / "cells").mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    log_budgets(cfg)
    if cfg.per_pairs():  # the picks recorded so far; the other cells are swept in the loop below, just before each
        cfg = cfg.with_tuning({n: r["picked"] for n in cfg.sweep_names() if (r := sweep_record(output, n)) is not None})
    elif cfg.sweep is not None:
        cfg = cfg.with_tuning(tune(cfg.methods, cfg.sweep, output, lambda spec: cfg.cell_config(spec, cfg.sweep_pairs()),
                                   only=only, run=not report_only, device=device))

    cells = cfg.cells()
    results = finished_cells(cfg, output)
    todo = [] if report_only else [(spec, pairs) for spec, pairs in cfg.cells(only) if cell_name(spec, pairs) not in results]
    if results:
        logger.info("resuming: %d/%d cells already finished under %s (skipped: %s)", len(results), len(cells),
                    output, ", ".join(results))
    meta = {"command": command, "started_at": started_at, "torch_version": torch.__version__,
            "threads": torch.get_num_threads(), "device": device_name(device), **git_commit(Path(repo_root) if repo_root else Path.cwd())}

    finished_here: list[float] = []
    for spec, pairs in todo:
        index = cells.index((spec, pairs)) + 1
        cell_started = time.perf_counter()
        if not cfg.tuned_ready(spec, pairs):  # per_pairs: this cell's own sweep, from the cell's own start
            record = run_sweep(cell_name(spec, pairs), spec.method, cfg.cell_config(spec, pairs, output, tuned=False),
                               cfg.sweep, output, device=device, warm_start=True)
            cfg = cfg.with_tuning({**cfg.tuning, cell_name(spec, pairs): record["picked"]})
        cell = run_cell(cfg, spec, pairs, output, index, len(cells), device=device)
        write_json_atomic(output / "cells" / f"{cell['cell']}.json", cell)
        shutil.rmtree(output / "runs" / cell["cell"] / "checkpoints", ignore_errors=True)  # reader/ stays
        results = finished_cells(cfg, output)
        finished_here.append(time.perf_counter() - cell_started)
        left = len(todo) - len(finished_here)
        elapsed = time.perf_counter() - started
        eta = sum(finished_here) / len(finished_here) * left  # crude: cells differ in cost by method and N
        logger.info("cell %d/%d %s done: EM %.3f at K %s, best %.3f at K %s | %d/%d cells done, elapsed %.0fs, "
                    "eta %.0fs", index, len(cells), cell["cell"], cell["em_trained"], cell["k_train"], cell["em_best"],
                    cell["best_k_eval"], len(results), len(cells), elapsed, eta)
        write_results(cfg, output, results, meta, time.perf_counter() - started)
    summary = write_results(cfg, output, finished_cells(cfg, output), meta, time.perf_counter() - started)
    logger.info("capacity benchmark: %d/%d cells in %s (this run %.0fs)", len(results), len(cells), output,
                time.perf_counter() - started)
    return summary


def log_budgets(cfg: CapacityConfig) -> None:
    """Log each method's training budget; warn when they differ (the comparison assumes the same budget)."""
    budgets = {}
    for spec in cfg.methods:
        train_cfg = cfg.cell_config(spec, cfg.pairs[0])
        budgets[spec.name] = (train_cfg.optim.max_steps, train_cfg.optim.batch_size)
        logger.info("budget %s: %d steps x batch %d per cell (N in %s), backbone %s d=%d layers=%d seed %d, m=%d",
                    spec.name, *budgets[spec.name], cfg.pairs, train_cfg.model.arch, train_cfg.model.hidden_size,
                    train_cfg.model.num_layers, train_cfg.model.seed, train_cfg.memory.num_memory)
    if len(set(budgets.values())) > 1:
        logger.warning("training budgets differ between methods: %s", budgets)


def write_results(cfg: CapacityConfig, output: Path, cells: dict[str, dict[str, Any]], meta: dict[str, Any],
                  wall_s: float) -> dict[str, Any]:
    """results.json, results.md and capacity.png from the cells finished so far (each file replaced atomically)."""
    ordered = [cells[cell_name(s, n)] for s, n in cfg.cells() if cell_name(s, n) in cells]
    summary = jsonable({
        **meta, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": wall_s, "cells_wall_s": sum(c["train_wall_s"] + c["eval_wall_s"] for c in ordered),
        "complete": len(ordered) == len(cfg.cells()), "config": cfg.to_dict(), "cells": ordered,
        "sweep": {n: r for n in cfg.sweep_names() if (r := sweep_record(output, n)) is not None},
    })
    write_json_atomic(output / "results.json", summary)
    write_atomic(output / "results.md", render_markdown(cfg, summary))
    plot(cfg, summary, output / "capacity.png")
    return summary


# ---------------------------------------------------------------------------------------------- reports
def budget_text(budget: dict[str, Any]) -> str:
    """``at most max_steps x batch`` (and the wall-time cap); each cell's table entry gives the steps it trained."""
    cap = f", cap {budget['max_seconds']:g} s" if budget.get("max_seconds") else ""
    return f"<= {budget['max_steps']} x {budget['batch_size']}{cap}"


def render_markdown(cfg: CapacityConfig, summary: dict[str, Any]) -> str:
    """Two tables: EM per method and N (trained K, best K_eval, paper), and EM per K_eval for gradmem/rmt."""
    cells = {c["cell"]: c for c in summary["cells"]}
    first = cfg.cell_config(cfg.methods[0], cfg.pairs[0])
    m, d = first.memory.num_memory, first.model.hidden_size
    command = " ".join(summary.get("command") or []) or "-"
    status = "complete" if summary["complete"] else f"INCOMPLETE: {len(cells)}/{len(cfg.cells())} cells"
    lines = [
        "# Capacity: exact match (%) on key-value retrieval",
        "",
        f"- command: `{command}` ({status})",
        f"- commit: {summary.get('commit') or '-'}{' (with uncommitted changes)' if summary.get('dirty') else ''}",
        (f"- wall time: {summary['cells_wall_s']:.0f} s over all cells (this invocation {summary['wall_time_s']:.0f} s); "
         f"{summary.get('device', '-')}, {summary.get('threads', '-')} torch threads, torch {summary['torch_version']}"),
        (f"- backbone: {first.model.arch}, {first.model.num_layers} layers, d = {d}, from scratch (seed {first.model.seed}); "
         f"memory of gradmem and rmt: {m} vectors x {d}"),
        f"- evaluation: {cfg.eval_samples} held-out samples per cell and K_eval",
        "",
        ("Each cell: EM at the trained K / best EM over K_eval (@K), [the steps it trained: early stopping or the "
         "cap], then the paper's figures for the same method, trained K and N (8 vectors of 128; `-`: none)."),
        "",
        "| method | K train | budget | " + " | ".join(f"N = {n}" for n in cfg.pairs) + " |",
        "|---|---|---|" + "---|" * len(cfg.pairs),
    ]
    for spec in cfg.methods:
        row = []
        budget = "-"
        k = "-"
        for pairs in cfg.pairs:
            c = cells.get(cell_name(spec, pairs))
            if c is None:
                row.append("(not run)")
                continue
            budget = budget_text(c["budget"])
            steps = f" [{c['budget'].get('trained_steps', c['budget']['max_steps'])} st]"
            k = str(c["k_train"]) if c["k_train"] is not None else "-"
            paper = c["paper"]["trained"] or "-"
            if c["k_train"] is None:
                row.append(f"{pct(c['em_trained'])}{steps} (paper {paper})")
            else:
                best = c["paper"]["best"]
                row.append(f"{pct(c['em_trained'])} / {pct(c['em_best'])} @K{c['best_k_eval']}{steps} "
                           f"(paper {paper}{' / ' + best if best else ''})")
        lines.append(f"| {spec.name} ({spec.method}) | {k} | {budget} | " + " | ".join(row) + " |")

    ks = sorted({int(k) for c in cells.values() if c["k_train"] is not None for k in c["eval"]})
    if ks:
        lines += ["", "EM (%) by WRITE steps at evaluation (K_eval); the paper's figure in brackets where it gives one.",
                  "", "| method | K train | N | " + " | ".join(f"K_eval {k}" for k in ks) + " |",
                  "|---|---|---|" + "---|" * len(ks)]
        for spec in cfg.methods:
            for pairs in cfg.pairs:
                c = cells.get(cell_name(spec, pairs))
                if c is None or c["k_train"] is None:
                    continue
                row = []
                for k in ks:
                    score = c["eval"].get(str(k))
                    paper = c["paper"]["k_eval"].get(str(k))
                    text = "-" if score is None else pct(score["em"])
                    text = f"**{text}**" if k == c["k_train"] else text
                    row.append(text + (f" [{paper}]" if paper else ""))
                lines.append(f"| {spec.name} | {c['k_train']} | {pairs} | " + " | ".join(row) + " |")
    lines += capacity_section(cfg, cells)
    lines += sweep_section(summary.get("sweep") or {})
    return "\n".join(lines) + "\n"


def largest_n(cfg: CapacityConfig, cells: dict[str, dict[str, Any]], spec: MethodSpec, key: str,
              threshold: float = 0.9) -> int | None:
    """The largest N whose cell holds ``threshold`` EM (``key``: em_trained or em_best), None when none does."""
    held = [n for n in cfg.pairs if (c := cells.get(cell_name(spec, n))) is not None and c[key] >= threshold]
    return max(held) if held else None


def capacity_section(cfg: CapacityConfig, cells: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: per method, the largest N held at >= 90% EM (at the trained K and at the best K_eval)."""
    lines = ["", "Capacity: the largest N each method holds at >= 90% test EM (same m x d for gradmem and rmt):", "",
             "| method | at trained K | at best K_eval |", "|---|---|---|"]
    for spec in cfg.methods:
        trained, best = largest_n(cfg, cells, spec, "em_trained"), largest_n(cfg, cells, spec, "em_best")
        lines.append(f"| {spec.name} | {trained if trained is not None else 'none'} | "
                     f"{best if best is not None else 'none'} |")
    return lines


def plot(cfg: CapacityConfig, summary: dict[str, Any], path: Path) -> None:
    """Two panels: EM vs N per method (solid: trained K, dotted: best K_eval); EM vs K_eval at the largest N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {c["cell"]: c for c in summary["cells"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    largest = max((c["pairs"] for c in cells.values()), default=cfg.pairs[-1])
    k_ticks: set[int] = set()
    for i, spec in enumerate(cfg.methods):
        color = colors[i % len(colors)]
        done = [cells[cell_name(spec, n)] for n in cfg.pairs if cell_name(spec, n) in cells]
        if not done:
            continue
        xs = [c["pairs"] for c in done]
        left.plot(xs, [100 * c["em_trained"] for c in done], "o-", color=color, label=spec.name)
        if spec.trained_steps:
            left.plot(xs, [100 * c["em_best"] for c in done], ":", color=color, alpha=0.8)
        c = cells.get(cell_name(spec, largest))
        if c is None:
            continue
        if spec.trained_steps:
            ks = sorted(int(k) for k in c["eval"])
            k_ticks.update(ks)
            right.plot(ks, [100 * c["eval"][str(k)]["em"] for k in ks], "o-", color=color, label=f"{spec.name} (K train {c['k_train']})")
            right.plot([c["k_train"]], [100 * c["em_trained"]], "s", color=color, markersize=10, fillstyle="none")
        else:
            right.axhline(100 * c["em_trained"], color=color, linestyle="--", label=spec.name)
    left.set_xscale("log", base=2)
    left.set_xticks(cfg.pairs, [str(n) for n in cfg.pairs])
    left.set_xlabel("pairs N")
    left.set_ylabel("exact match %")
    left.set_ylim(-3, 103)
    left.set_title("EM vs N (solid: trained K; dotted: best K_eval)", fontsize=10)
    left.legend(fontsize=8)
    if k_ticks:
        right.set_xticks(sorted(k_ticks))
    right.set_xlabel("WRITE steps at evaluation (K_eval)")
    right.set_ylabel("exact match %")
    right.set_ylim(-3, 103)
    right.set_title(f"EM vs K_eval at N = {largest} (square: trained K)", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.benchmark_parser(__doc__, "benchmarks/configs/capacity_*.yaml")
    parser.add_argument("--only", default=None, help="comma-separated method names to run (default: all); "
                        "processes with disjoint lists can share one --output")
    parser.add_argument("--report-only", action="store_true",
                        help="write results.json/md/png from the cells finished so far, train nothing")
    args = parser.parse_args(argv)
    only = [name for name in args.only.split(",") if name] if args.only else None
    try:
        device = common.start_benchmark(args)
        cfg = CapacityConfig.from_yaml(args.config)
        cfg.cells(only)  # unknown names fail here
    except (OSError, ValueError) as exc:
        print(f"capacity: bad config {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    output = args.output or str(common.ROOT / "runs" / ("capacity_" + Path(args.config).name.removesuffix(".yaml")
                                                        .removeprefix("capacity_")))
    command = ["python", "-m", "benchmarks.capacity", *(sys.argv[1:] if argv is None else argv)]
    summary = run_capacity(cfg, output, max_steps=args.max_steps, command=command, repo_root=common.ROOT,
                           device=device, only=only, report_only=args.report_only)
    print((Path(output) / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
