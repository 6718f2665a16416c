"""The training checkpoint layout: one format, written and resumed by the in-process Trainer and the Ray loop.

A checkpoint is a directory (``step_00000500``)::

    reader/                  the reader at that step: safetensors, config, tokenizer (Reader.from_pretrained)
    best/                    the best reader by validation so far, with best.json (absent before an evaluation)
    optimizer_rank{R}.pt     rank R's optimizer (a ZeRO partition under DeepSpeed) and scheduler state:
                             tensors and plain containers only, loaded with ``torch.load(weights_only=True)``
    trainer_state.json       step, world size, engine, optimizer format, why training stopped, the best
                             record, the resolved config

Nothing is unpickled on resume (DeepSpeed's own checkpoint files would be, so they are not used). Rank 0 writes
``reader/``, ``best/`` and ``trainer_state.json``; every rank writes its optimizer file (Ray merges the ranks'
directories). A checkpoint resumes in any loop with the same world size and optimizer format: ``torch`` (the
in-process Trainer and plain data parallel: whole AdamW state on every rank) or ``deepspeed_zero{S}``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from gradmem.atomic import atomic_path
from gradmem.reader import Reader

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"


def optimizer_file(directory: Path, rank: int) -> Path:
    return directory / f"optimizer_rank{rank}.pt"


def save(directory: Path, engine, state: dict[str, Any], best_dir: Path | None) -> None:
    """This rank's part of a checkpoint in ``directory`` (which exists). ``state`` is the loop's own
    (step, stopped, best, config); ``best_dir`` the best reader so far, if any."""
    torch.save(engine.optimizer_state(), optimizer_file(directory, engine.rank))
    if engine.rank != 0:
        return
    engine.reader.save_pretrained(directory / "reader")
    if best_dir is not None:
        shutil.copytree(best_dir, directory / "best")
    layout = {"world_size": engine.world, "engine": engine.name, "zero_stage": engine.zero_stage,
              "optimizer_format": engine.optimizer_format}
    (directory / STATE_FILE).write_text(json.dumps({**state, **layout}, indent=2))


def load(directory: Path, engine) -> dict[str, Any]:
    """Load weights and this rank's optimizer state into ``engine``; return the loop's state (step, stopped,
    best). Refuses a checkpoint of another world size or optimizer format, naming both."""
    state = json.loads((directory / STATE_FILE).read_text())
    world, fmt = state.get("world_size", 1), optimizer_format(state)
    if world != engine.world or fmt != engine.optimizer_format:
        raise ValueError(
            f"checkpoint {directory} was written by {world} worker(s) with optimizer format {fmt} "
            f"(engine {state.get('engine')}); this run has {engine.world} with {engine.optimizer_format} "
            f"(engine {engine.name}). Resume with the same layout, or start a new run from its reader/ directory "
            "(model.pretrained).")
    reader_dir = directory / "reader" if (directory / "reader").is_dir() else directory  # the Trainer's layout before this one
    optim_file = optimizer_file(directory, engine.rank)
    if not optim_file.is_file() and (directory / "optimizer.pt").is_file():  # ditto
        optim_file = directory / "optimizer.pt"
    loaded = Reader.from_pretrained(reader_dir, trainable=True, device=engine.reader.device)
    engine.reader.load_state_dict(loaded.state_dict())
    engine.load_optimizer_state(torch.load(optim_file, weights_only=True, map_location=engine.reader.device))
    return state


def optimizer_format(state: dict[str, Any]) -> str:
    """The optimizer format a checkpoint's state names (checkpoints before the field: derived from the engine)."""
    if "optimizer_format" in state:
        return state["optimizer_format"]
    return "torch" if state.get("engine", "local") in ("local", "ddp") else f"deepspeed_zero{state.get('zero_stage') or 0}"


def restore_best(directory: Path, best_dir: Path) -> None:
    """Make ``best_dir`` the checkpoint's best reader (or remove it when the checkpoint has none)."""
    if (directory / "best").is_dir():
        with atomic_path(best_dir) as tmp:
            shutil.copytree(directory / "best", tmp)
    elif best_dir.exists():
        shutil.rmtree(best_dir)


def read_best(best_dir: Path) -> dict[str, Any] | None:
    """The best record ({"step", "em", "token_acc"}) stored with a best reader, or None."""
    path = best_dir / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def export_source(directory: Path, select_best: bool) -> Path:
    """The reader directory to export from a checkpoint: its best by validation when there is one and
    ``select_best``, else the reader at the checkpoint's step."""
    if select_best and (directory / "best" / BEST_FILE).is_file():
        return directory / "best"
    return directory / "reader"


def export_reader(source: Path, output: Path, marker: str | None = None) -> Path:
    """Copy the reader directory ``source`` to ``output`` atomically, verified by loading it (the fingerprint is
    checked) before it is published; ``marker`` names an extra file that says who wrote the export."""
    with atomic_path(output) as tmp:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(BEST_FILE))
        Reader.from_pretrained(tmp)
        if marker is not None:
            (tmp / marker).write_text("exported by gradmem's training loop; --output may replace this directory\n")
    logger.info("reader exported to %s (from %s)", output, source)
    return output
