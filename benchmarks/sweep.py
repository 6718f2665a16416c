"""Tuning before comparing: a short sweep of each method's learning rate (and GradMem's alpha), picked on validation.

A benchmark config (capacity or comparison) may carry a ``sweep:`` section::

    sweep: {lr: [0.0003, 0.001, 0.003], write_lr: [0.5, 2.0], max_steps: 1000, pairs: 1}

Before a method's cells are trained, every candidate (each ``lr``; for GradMem each ``lr`` x ``write_lr``) trains
``max_steps`` steps from scratch on that method's cell config (capacity: at N = ``pairs``, default the smallest N)
through the ordinary ``Trainer``, which evaluates on validation data every ``run.eval_every`` steps and keeps its
best. The candidate with the best validation EM (ties: token accuracy, then the earlier step that reached it, then
the earlier candidate) is picked, and
the method's cells train with it. The test data are never looked at: the sweep reads only ``Trainer.best_record``.

Every method gets the same candidates for ``lr`` and the same steps, so the tuning effort is equal; alpha is
GradMem's alone (the other methods have no inner step size). Results: ``OUTPUT/sweep/<method>.json`` (atomic;
a rerun reuses it when the candidates and the method's config are unchanged), reported beside the cells.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import Field, model_validator

from benchmarks.common import jsonable, write_json_atomic
from gradmem.config import declared, from_dict
from gradmem.train import TrainConfig, Trainer

logger = logging.getLogger(__name__)

ALPHA_METHODS = ("gradmem",)  # methods whose WRITE has a step size to tune


@declared
class SweepConfig:
    """The ``sweep:`` section of a benchmark config: the candidates every method tries, and their budget."""

    lr: list[Annotated[float, Field(gt=0)]] = Field(default_factory=list, description="AdamW learning rates, every method")
    write_lr: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list, description="alpha candidates, GradMem only (empty: keep its alpha)")
    max_steps: int = Field(500, ge=1, description="each candidate's training budget")
    pairs: int | None = Field(None, ge=1, description="capacity only: the N candidates train at (None: the smallest N)")
    per_pairs: bool = Field(False, description="capacity only: sweep every (method, N) cell just before it trains, "
                                               "from the cell's own start (its curriculum warm start included)")

    @model_validator(mode="after")
    def _has_candidates(self) -> "SweepConfig":
        if not self.lr and not self.write_lr:
            raise ValueError("sweep needs candidates: sweep.lr and/or sweep.write_lr")
        if self.per_pairs and self.pairs is not None:
            raise ValueError("sweep.pairs and sweep.per_pairs exclude each other (per_pairs sweeps at every N)")
        return self

    @classmethod
    def from_dict(cls, data: Any) -> "SweepConfig":
        return from_dict(cls, data)

    def candidates(self, method: str) -> list[dict[str, float]]:
        """The settings tried for ``method``: each lr, crossed with each alpha for GradMem. {} keys: lr, write_lr."""
        lrs = [{"lr": float(v)} for v in self.lr] or [{}]
        alphas = [{"write_lr": float(v)} for v in self.write_lr] if method in ALPHA_METHODS else []
        return [{**a, **b} for a in lrs for b in (alphas or [{}])]


def pick(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the best validation result: EM, then token accuracy, then the earlier step at which that best
    was reached (equal scores: the setting that learns faster is the better tuned); full ties go to the earlier trial.

    ``trials``: [{"candidate": {...}, "validation": {"em", "token_acc", "step"} or None}, ...]. Only the
    ``validation`` entry is read, whatever else a trial carries."""
    scored = [t for t in trials if t.get("validation")]
    if not scored:
        raise ValueError("no sweep trial has a validation result (is run.eval_every > 0?)")
    best = max(range(len(scored)), key=lambda i: (scored[i]["validation"]["em"], scored[i]["validation"]["token_acc"],
                                                   -scored[i]["validation"]["step"], -i))
    return scored[best]


def apply(cfg: TrainConfig, candidate: dict[str, float]) -> TrainConfig:
    """``cfg`` with a candidate's learning rate and alpha."""
    data = cfg.to_dict()
    if "lr" in candidate:
        data["optim"]["lr"] = candidate["lr"]
    if "write_lr" in candidate:
        data["memory"]["write_lr"] = candidate["write_lr"]
    return TrainConfig.from_dict(data)


def trial_config(cfg: TrainConfig, candidate: dict[str, float], sweep: SweepConfig,
                 warm_start: bool = False) -> TrainConfig:
    """A candidate's short run: the method's cell config with the candidate, ``sweep.max_steps`` steps, from scratch
    (``warm_start``: from the cell's own warm start, as it will train), validation at least 5 times; no wall-time
    cap (every candidate gets the same steps)."""
    data = apply(cfg, candidate).to_dict()
    data["optim"]["max_steps"] = sweep.max_steps
    if not warm_start:
        data["model"]["warm_start"] = None
    run = data["run"]
    run.update(max_seconds=None, save_every=0)
    if not run["eval_every"] or run["eval_every"] > sweep.max_steps // 5:
        run["eval_every"] = max(1, sweep.max_steps // 5)
    return TrainConfig.from_dict(data)


def run_sweep(name: str, method: str, cell_config: TrainConfig, sweep: SweepConfig, output: Path,
              device: str = "cpu", warm_start: bool = False) -> dict[str, Any]:
    """Try every candidate for one method or cell (``name``) on ``cell_config``; write and return the record with
    the pick. ``warm_start``: the candidates start from the cell's warm start (else from scratch).

    A record already on disk for the same candidates and config is returned as it is (resume)."""
    path = output / "sweep" / f"{name}.json"
    identity = jsonable({"sweep": asdict(sweep), "config": portable(cell_config, output), "warm_start": warm_start})
    if path.is_file():
        done = json.loads(path.read_text())
        if same_identity(done.get("identity"), identity):
            return done
        raise ValueError(f"{path} was produced by another sweep or config; use another --output or delete it")
    trials = []
    for i, candidate in enumerate(sweep.candidates(method), start=1):
        trial_cfg = trial_config(cell_config, candidate, sweep, warm_start)
        run_dir = output / "sweep_runs" / f"{name}_{i}"
        logger.info("sweep %s %d/%d: %s for %d steps", name, i, len(sweep.candidates(method)), candidate,
                    sweep.max_steps)
        started = time.perf_counter()
        trainer = Trainer(trial_cfg, run_dir, device=device)
        trainer.fit(resume=True)
        best = trainer.best_record()
        trials.append({"candidate": candidate, "validation": best, "trained_steps": trainer.step,
                       "wall_s": time.perf_counter() - started})
        logger.info("sweep %s %d: best validation EM %s", name, i, "-" if best is None else f"{best['em']:.4f}")
    chosen = pick(trials)
    record = jsonable({"name": name, "method": method, "identity": identity, "trials": trials,
                       "picked": chosen["candidate"], "picked_validation": chosen["validation"],
                       "selection": "best validation EM, then token accuracy; test data never evaluated"})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    logger.info("sweep %s: picked %s (validation EM %.4f)", name, chosen["candidate"], chosen["validation"]["em"])
    return record


def portable(cfg: TrainConfig, output: Path) -> dict[str, Any]:
    """``cfg`` as a dict with a warm start inside ``output`` named from there (``OUTPUT/runs/...``, as the cells'
    fingerprints name it), so that a moved output directory keeps its finished sweeps."""
    data = cfg.to_dict()
    start = data["model"].get("warm_start")
    if start and Path(start).resolve().is_relative_to(Path(output).resolve()):
        data["model"]["warm_start"] = str(Path("OUTPUT") / Path(start).resolve().relative_to(Path(output).resolve()))
    return data


def same_identity(stored: Any, current: dict[str, Any]) -> bool:
    """Whether a recorded sweep was run with the current candidates and config. The stored sweep settings are read
    back through today's SweepConfig (and a record without ``warm_start`` started from scratch), so a setting added
    since, at the default that keeps the old behaviour, does not invalidate a finished sweep."""
    if not isinstance(stored, dict) or not isinstance(stored.get("sweep"), dict):
        return False
    try:
        settings = asdict(SweepConfig.from_dict(stored["sweep"]))
    except (TypeError, ValueError):
        return False
    return jsonable({**stored, "sweep": settings, "warm_start": stored.get("warm_start", False)}) == current


def sweep_record(output: Path, name: str) -> dict[str, Any] | None:
    """A method's finished sweep under ``output`` (None: not swept yet)."""
    path = output / "sweep" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def tune(specs: list[Any], sweep: SweepConfig, output: Path, config_for: Callable[[Any], TrainConfig],
         only: list[str] | None = None, run: bool = True, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Method name -> picked candidate, for every method whose sweep is recorded under ``output``; the sweeps of
    the methods in ``only`` (all when None) are run first when missing. ``specs``: MethodSpecs (name, method);
    ``config_for(spec)``: the TrainConfig the method's candidates start from. Several processes with disjoint
    ``only`` lists share one output: each sweeps its own methods and sees the others' picks once recorded.
    ``run=False`` runs no sweep (reports)."""
    picks = {}
    for spec in specs:
        record = sweep_record(output, spec.name)
        if record is None and run and (not only or spec.name in only):
            record = run_sweep(spec.name, spec.method, config_for(spec), sweep, output, device=device)
        if record is not None:
            picks[spec.name] = record["picked"]
    return picks


def sweep_section(records: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: what each method tried and what it picked."""
    if not records:
        return []
    lines = ["", "Tuning (validation only; each candidate trained the same steps, stopping at EM 1.0, from scratch or, "
             "where marked, from the cell's own curriculum warm start):", "",
             "| method | tried: best validation EM % @ the step it was first reached | picked |", "|---|---|---|"]
    for name, rec in records.items():
        tried = ", ".join(f"{fmt(t['candidate'])}: {100 * t['validation']['em']:.1f} @{t['validation']['step']}"
                          if t["validation"] else
                          f"{fmt(t['candidate'])}: -" for t in rec["trials"])
        identity = rec.get("identity") or {}
        warm = identity.get("warm_start") and (identity.get("config") or {}).get("model", {}).get("warm_start")
        start = " (warm start)" if warm else ""
        lines.append(f"| {name}{start} | {tried} | {fmt(rec['picked'])} |")
    return lines


def fmt(candidate: dict[str, float]) -> str:
    return " ".join(f"{k} {v:g}" for k, v in candidate.items()) or "(config as is)"

