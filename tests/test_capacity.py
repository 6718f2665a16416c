"""The capacity benchmark (benchmarks/capacity.py) on its smoke configuration.

What is checked: the entrypoint runs every (method, N) cell end to end and writes results.json, results.md and
capacity.png that parse; results.json round-trips; a rerun retrains only the cells whose json is missing (seen
in the log and in the untouched files' mtimes) and reproduces them exactly; a cell cut off mid-training
continues from its Trainer checkpoint; bad configs fail before any training with a message that names the fault.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from benchmarks import capacity
from benchmarks.capacity import CapacityConfig, paper_figure, run_capacity
from gradmem.train import Trainer
from conftest import markdown_rows

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "configs" / "capacity_smoke.yaml"


def trained_cells(caplog) -> list[str]:
    """Cells that this run trained, from the benchmark's own log records."""
    return sorted(r.getMessage().split()[2] for r in caplog.records
                  if r.name == "benchmarks.capacity" and ": training " in r.getMessage())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke config run once through the entrypoint; tests that change the output work on a copy."""
    out = tmp_path_factory.mktemp("capacity") / "smoke"
    summary = capacity.main(["--config", str(SMOKE), "--output", str(out), "--threads", "1", "--device", "cpu"])
    return out, summary


def expected_cells() -> list[str]:
    cfg = CapacityConfig.from_yaml(SMOKE)
    return [f"{spec.name}_N{n}" for n in cfg.pairs for spec in cfg.methods]


# ------------------------------------------------------------------------------------------ the run
def test_smoke_run_writes_every_cell_and_the_reports(smoke_run):
    out, _ = smoke_run
    names = expected_cells()
    assert len(names) == 8
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and [c["cell"] for c in results["cells"]] == names
    assert sorted(p.stem for p in (out / "cells").glob("*.json")) == sorted(names)
    assert not list((out / "cells").glob(".*"))  # no temporary files left behind
    assert results["torch_version"] and results["wall_time_s"] > 0 and results["cells_wall_s"] > 0
    assert len(results["commit"]) == 40 and results["config"]["pairs"] == [1, 2]
    for cell in results["cells"]:
        assert 0.0 <= cell["em_trained"] <= cell["em_best"] <= 1.0
        assert cell["budget"] == {"max_steps": 30, "batch_size": 16, "train_samples": 480, "max_seconds": None,
                                  "trained_steps": 30}
        if cell["method"] in ("gradmem", "rmt"):
            assert sorted(cell["eval"]) == ["1", "2"] and cell["k_train"] == 1
        else:
            assert len(cell["eval"]) == 1 and cell["k_train"] is None
        assert cell == json.loads((out / "cells" / f"{cell['cell']}.json").read_text())
        assert not (out / "runs" / cell["cell"] / "checkpoints").exists()  # dropped once the cell is saved
        assert (out / "runs" / cell["cell"] / "reader" / "config.json").exists()

    # the report's main table shows every cell's own figures: EM at the trained K (%) and the steps it trained
    rows = markdown_rows((out / "results.md").read_text(), "| method | K train | budget |")
    for cell in results["cells"]:
        row = rows[f"{cell['name']} ({cell['method']})"]
        shown = row[f"N = {cell['pairs']}"]
        assert shown.startswith(f"{100 * cell['em_trained']:.1f}"), (cell["cell"], shown)
        assert f"[{cell['budget']['trained_steps']} st]" in shown
    assert results["command"] == ["python", "-m", "benchmarks.capacity", "--config", str(SMOKE), "--output",
                                  str(out), "--threads", "1", "--device", "cpu"]  # how to reproduce it

    import matplotlib.image

    png = out / "capacity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 100


def test_results_json_round_trips(smoke_run):
    out, summary = smoke_run
    text = (out / "results.json").read_text()
    loaded = json.loads(text)
    assert loaded == summary  # what main() returned is exactly what it wrote
    assert json.loads(json.dumps(loaded)) == loaded
    assert "NaN" not in text  # the bounds' missing write loss is null, not non-standard JSON


def test_rerun_retrains_only_the_missing_cell(smoke_run, tmp_path, caplog):
    src, _ = smoke_run
    out = tmp_path / "smoke"
    shutil.copytree(src, out)
    cells = out / "cells"
    before = json.loads((cells / "rmt_N2.json").read_text())
    (cells / "rmt_N2.json").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    caplog.set_level("INFO")
    summary = capacity.main(["--config", str(SMOKE), "--output", str(out), "--threads", "1", "--device", "cpu"])
    assert trained_cells(caplog) == ["rmt_N2"]
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json") if p.name != "rmt_N2.json"} == mtimes
    after = json.loads((cells / "rmt_N2.json").read_text())
    # data and initialisation are functions of the seeds, so the retrained cell reproduces the first one
    assert after["eval"] == before["eval"] and after["cell_config"] == before["cell_config"]
    assert summary["complete"] and len(summary["cells"]) == 8

    caplog.clear()
    capacity.main(["--config", str(SMOKE), "--output", str(out), "--threads", "1", "--device", "cpu"])
    assert trained_cells(caplog) == []  # everything finished: nothing retrained


def test_finished_cells_of_another_config_are_refused(smoke_run, tmp_path):
    src, _ = smoke_run
    out = tmp_path / "smoke"
    shutil.copytree(src, out)
    with pytest.raises(ValueError, match="different config"):
        run_capacity(CapacityConfig.from_yaml(SMOKE), out, max_steps=31)


def test_interrupted_cell_continues_from_its_checkpoint(tmp_path, caplog):
    """A cell cut off mid-training (simulated: its Trainer ran 20 of 30 steps) resumes at step 20, not 0."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(pairs=[1], methods=[{"name": "gradmem_k1", "method": "gradmem", "write_steps": 1}], eval_samples=16)
    data["run"]["save_every"] = 10
    cfg = CapacityConfig.from_dict(data)
    Trainer(cfg.cell_config(cfg.methods[0], 1), tmp_path / "runs" / "gradmem_k1_N1").fit(max_steps=20)
    caplog.set_level("INFO")
    summary = run_capacity(cfg, tmp_path)
    assert any("resumed at step 20" in r.getMessage() for r in caplog.records)
    assert summary["cells"][0]["budget"]["trained_steps"] == 30


def test_per_pairs_sweeps_every_cell_from_its_curriculum_start(tmp_path, caplog):
    """``sweep.per_pairs``: each (method, N) cell is swept just before it trains, its candidates starting where the
    cell starts (N = 2 from the method's N = 1 reader), and the cell trains with its own pick; a rerun sweeps
    nothing again."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(methods=data["methods"][:2], curriculum=True, eval_samples=16,
                sweep={"lr": [0.003, 0.0003], "write_lr": [0.5, 1.0], "max_steps": 6, "per_pairs": True})
    data["run"].update(eval_every=3, eval_samples=16)
    cfg = CapacityConfig.from_dict(data)
    summary = run_capacity(cfg, tmp_path, max_steps=6)
    names = ["gradmem_k1_N1", "rmt_N1", "gradmem_k1_N2", "rmt_N2"]
    assert [c["cell"] for c in summary["cells"]] == names and sorted(summary["sweep"]) == sorted(names)
    for cell in summary["cells"]:
        record = summary["sweep"][cell["cell"]]
        assert len(record["trials"]) == (4 if cell["method"] == "gradmem" else 2)
        assert cell["cell_config"]["train"]["optim"]["lr"] == record["picked"]["lr"]
        start = record["identity"]["config"]["model"]["warm_start"]
        if cell["pairs"] == 2:  # the candidates started from the N = 1 reader, as the cell did
            assert start == f"OUTPUT/runs/{cell['name']}_N1/reader" and record["identity"]["warm_start"]
            assert cell["cell_config"]["train"]["model"]["warm_start"] == start
            trial = yaml.safe_load((tmp_path / "sweep_runs" / f"{cell['cell']}_1" / "config.yaml").read_text())
            assert trial["model"]["warm_start"] == str(tmp_path / "runs" / f"{cell['name']}_N1" / "reader")
        else:
            assert start is None
    caplog.set_level("INFO", logger="benchmarks.sweep")
    caplog.clear()
    again = run_capacity(cfg, tmp_path, max_steps=6)
    assert again["complete"] and not [r for r in caplog.records if r.name == "benchmarks.sweep"]


# ------------------------------------------------------------------------------------------ bad configs
def smoke_dict() -> dict:
    return yaml.safe_load(SMOKE.read_text())


@pytest.mark.parametrize("change, message", [
    ({"methods": [{"name": "lstm", "method": "lstm"}]}, r"methods\.0\.method: unknown method 'lstm'"),
    ({"pairs": []}, "non-empty list of pair counts"),
    ({"pairs": None}, r"pairs: Input should be a valid list"),
    ({"pairs": [2, 0]}, r"pairs\.1: Input should be greater than or equal to 1"),
    ({"pairs": [2, 2]}, "distinct positive integers"),
    ({"methods": []}, "at least one entry"),
    ({"methods": [{"method": "gradmem"}]}, r"methods\.0\.name: Field required"),
    ({"methods": [{"name": "a", "method": "rmt"}, {"name": "a", "method": "gradmem"}]}, "unique"),
    ({"methods": [{"name": "a/b", "method": "rmt"}]}, "it names files"),
    ({"methods": [{"name": "g", "method": "gradmem", "write_lr": {1: 0.5}}]}, r"methods\.0\.write_lr: 'g' has no value for N = \[2\]"),
    ({"methods": [{"name": "g", "method": "gradmem", "write_lr": 0}]}, r"methods\.0\.write_lr: alpha must be > 0"),
    ({"methods": [{"name": "g", "method": "gradmem", "k": 2}]}, r"methods\.0\.k: unknown key \(a typo\?\)"),
    ({"eval_steps": []}, "eval_steps"),
    ({"eval_samples": 0}, r"eval_samples: Input should be greater than or equal to 1"),
    ({"pair": [1]}, r"pair: unknown key \(a typo\?\)"),
    ({"tuning": {"rmt": {"lr": 0.1}}}, "tuning: set from the sweep records"),
    ({"sweep": {"lr": [1e-3], "pairs": 4}}, r"sweep\.pairs: 4 must be one of pairs \[1, 2\]"),
    ({"sweep": {"lr": [1e-3], "pairs": 1, "per_pairs": True}}, "exclude each other"),
    ({"task": {"name": "babi"}}, "key-value task"),
    ({"model": {"max_positions": 20}}, "needs model.max_positions >= 21"),
    ({"optim": {"attention": "sdpa"}}, "double backward"),
], ids=lambda v: str(v)[:40])
def test_bad_config_fails_fast(change, message):
    with pytest.raises(ValueError, match=message):
        CapacityConfig.from_dict({**smoke_dict(), **change})


def test_a_capacity_config_is_frozen_and_changes_make_validated_copies():
    cfg = CapacityConfig.from_dict(smoke_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.methods[0].max_steps = 3
    short = cfg.with_max_steps(3)
    assert [s.max_steps for s in short.methods] == [3] * len(cfg.methods)
    assert all(s.max_steps is None for s in cfg.methods)  # the original is unchanged
    assert short.cell_config(short.methods[0], 1).optim.max_steps == 3
    tuned = cfg.with_tuning({cfg.methods[0].name: {"lr": 0.01}})
    assert tuned.cell_config(tuned.methods[0], 1).optim.lr == 0.01 and not cfg.tuning
    assert copy.deepcopy(cfg) == cfg and CapacityConfig.from_dict(cfg.to_dict()) == cfg
    assert "tuning" not in tuned.to_dict() and dataclasses.asdict(tuned)["tuning"] == tuned.tuning
    with pytest.raises(ValueError, match=r"methods\.0\.max_steps: Input should be greater than or equal to 0"):
        cfg.with_max_steps(-1)


def test_bad_config_exits_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**smoke_dict(), "methods": [{"name": "x", "method": "transformer_xl"}]}))
    with pytest.raises(SystemExit) as exc:
        capacity.main(["--config", str(bad), "--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "unknown method 'transformer_xl'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_paper_figures_follow_the_paper_tables():
    assert paper_figure("rmt", 1, 16, 1) == "45.5"
    assert paper_figure("gradmem", 1, 32, 1) == "86.9" and paper_figure("gradmem", 1, 32, "best") == "98.3"
    assert paper_figure("gradmem", 2, 32, 2) == "98.2"
    assert paper_figure("gradmem", 2, 16, 2) is None  # the paper gives none
    assert paper_figure("full_context", None, 32, None) == "~100"
    assert paper_figure("no_context", None, 16, None) is None
