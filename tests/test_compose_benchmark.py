"""The composition benchmark (benchmarks/compose.py, issue 15 item 3) on its smoke configuration.

What is checked: the entrypoint trains and measures every (method, regime) cell and writes results.json,
results.md and compose.png; the report's tables show results.json's figures; a rerun skips the finished cells and
retrains only a missing one; bAbI stories run in chunks of statements with no oracle (with GRADMEM_DATA); the oracle
chunk is the one holding the queried key; a config whose longest document does not fit the backbone's positions is
refused before any training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from benchmarks import compose
from benchmarks.compose import ComposeConfig, oracle_chunk
from gradmem.data import Example
from gradmem.tasks.kv import KVTask
from conftest import markdown_rows, needs_data

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "configs" / "compose_smoke.yaml"
ARGS = ["--config", str(SMOKE), "--threads", "1", "--device", "cpu"]


def trained_cells(caplog) -> list[str]:
    return sorted(r.getMessage().split()[2].rstrip(":") for r in caplog.records
                  if r.name == "benchmarks.compose" and ": training " in r.getMessage())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compose") / "smoke"
    summary = compose.main([*ARGS, "--output", str(out)])
    return out, summary


def test_smoke_run_writes_every_cell_and_the_reports(smoke_run):
    out, _ = smoke_run
    cfg = ComposeConfig.from_yaml(SMOKE)
    names = [f"{s.name}-{r.name}" for s in cfg.methods for r in cfg.regimes]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and [c["cell"] for c in results["cells"]] == names
    assert sorted(p.stem for p in (out / "cells").glob("*.json")) == sorted(names)
    assert (out / "compose.png").stat().st_size > 0 and not list((out / "cells").glob(".*"))
    assert len(results["commit"]) == 40 and results["command"][:3] == ["python", "-m", "benchmarks.compose"]
    for cell in results["cells"]:
        assert cell["budget"]["trained_steps"] == 6 and cell["chunks_trained"] in ([1, 1], [1, 2])
        assert cell == json.loads((out / "cells" / f"{cell['cell']}.json").read_text())
        assert sorted(cell["by_c"], key=int) == ["1", "2", "3"]
        rows = [cell["by_c"][str(c)]["prefix_rows"] for c in (1, 2, 3)]
        per_chunk = 2 if cell["method"] != "full_context" else 8  # m = 2 vectors, or the chunk's 7N + 1 tokens
        assert rows == [per_chunk, 2 * per_chunk, 3 * per_chunk]
        for c, by in cell["by_c"].items():
            assert by["documents"] == 12 and by["mean_chunks"] == int(c) and by["oracle_documents"] == 12
            assert 0 <= by["em"] <= 1 and 0 <= by["oracle_em"] <= 1 and by["read_s_per_query"] > 0
        assert cell["by_c"]["1"]["em"] == cell["by_c"]["1"]["oracle_em"]  # one chunk: the oracle is the READ itself

    text = (out / "results.md").read_text()
    em = markdown_rows(text, "| method / regime")  # the first table: composed EM
    oracle_text = text[text.index("## Oracle chunk"):]
    oracle = markdown_rows(oracle_text, "| method / regime")
    for cell in results["cells"]:
        label = compose.row_label(cell)
        for c in ("1", "2", "3"):
            assert em[label][f"c = {c}"] == f"{100 * cell['by_c'][c]['em']:.1f}"
            assert oracle[label][f"c = {c}"] == f"{100 * cell['by_c'][c]['oracle_em']:.1f}"
    gains = markdown_rows(text[text.index("## What training with composition buys"):], "| method: regime vs c1")
    cells = {(c["name"], c["regime"]): c for c in results["cells"]}
    for method in ("gradmem", "rmt", "full_context"):
        for c in ("1", "2", "3"):
            diff = cells[(method, "c1to2")]["by_c"][c]["em"] - cells[(method, "c1")]["by_c"][c]["em"]
            assert gains[f"{method}: c1to2 vs c1"][f"c = {c}"] == f"{100 * diff:+.1f}"


def test_rerun_skips_finished_cells_and_retrains_a_missing_one(smoke_run, tmp_path, caplog):
    out, _ = smoke_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    kept = (copy / "cells" / "gradmem-c1.json").stat().st_mtime_ns
    (copy / "cells" / "rmt-c1to2.json").unlink()
    shutil.rmtree(copy / "runs" / "rmt-c1to2")
    caplog.set_level("INFO", logger="benchmarks.compose")
    summary = compose.main([*ARGS, "--output", str(copy)])
    assert trained_cells(caplog) == ["rmt-c1to2"]
    assert (copy / "cells" / "gradmem-c1.json").stat().st_mtime_ns == kept
    assert summary["complete"] and len(summary["cells"]) == 6


def test_oracle_chunk_is_the_chunk_holding_the_key():
    doc = Example(context=("!ab:cd!|", "!ef:gh!|", "!ij:kl!|"), query="?!ef:", target="gh!|")
    assert oracle_chunk(doc) == 1
    assert oracle_chunk(Example(context="!ab:cd!|", query="?!ab:", target="cd!|")) == 0
    assert oracle_chunk(Example(context=("x", "y"), query="Where is Mary?", target=" hall")) is None  # bAbI: unknown
    for e in KVTask(pairs=2, chunks=(5, 5)).examples(50, 7):  # generated documents: the answer's block is there
        j = oracle_chunk(e)
        assert j is not None and f"{e.query[1:]}{e.target[:2]}" in e.chunks[j]


def test_a_document_past_the_positions_is_refused_before_training():
    data = yaml.safe_load(SMOKE.read_text())
    data["eval_chunks"] = list(range(1, 9))  # full_context: 8 x 8 tokens + 8 > 64 positions
    with pytest.raises(ValueError, match="max_positions"):
        ComposeConfig.from_dict(data)


@needs_data
def test_babi_stories_in_chunks_without_an_oracle(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data.update(model={**data["model"], "max_positions": 512}, task={"name": "babi", "tasks": ["qa1"]},
                memory={**data["memory"], "max_context_tokens": 400}, methods=[{"name": "gradmem", "method": "gradmem"}],
                regimes=[{"name": "c1to2", "chunks": [1, 2]}])
    config = tmp_path / "babi.yaml"
    config.write_text(yaml.safe_dump(data))
    summary = compose.main(["--config", str(config), "--threads", "1", "--device", "cpu", "--output", str(tmp_path / "out")])
    (cell,) = summary["cells"]
    for c, by in cell["by_c"].items():
        assert by["oracle_em"] is None and by["oracle_documents"] == 0 and 1 <= by["mean_chunks"] <= int(c)
    rows = markdown_rows((tmp_path / "out" / "results.md").read_text(), "| method / regime")
    assert rows["(mean chunks per document)"]["c = 3"] == f"{cell['by_c']['3']['mean_chunks']:.2f}"


def test_every_cell_is_swept_on_validation_and_trains_with_its_pick(tmp_path, caplog):
    """A ``sweep:`` section tunes each (method, regime) cell on its own documents: every candidate recorded
    (GradMem crosses lr with alpha, the others try lr alone), the cell trained and reported with the pick; a rerun
    reuses the records; ``--max-steps`` caps the candidates' steps too."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(methods=data["methods"][:2], regimes=[{"name": "c1to2", "chunks": [1, 2]}], eval_chunks=[1, 2],
                sweep={"lr": [0.003, 0.0003], "write_lr": [0.5, 1.0], "max_steps": 50})
    config = tmp_path / "swept.yaml"
    config.write_text(yaml.safe_dump(data))
    args = ["--config", str(config), "--threads", "1", "--device", "cpu", "--output", str(tmp_path / "out"),
            "--max-steps", "4"]
    summary = compose.main(args)
    sweeps = summary["sweep"]
    assert sorted(sweeps) == ["gradmem-c1to2", "rmt-c1to2"]
    assert [t["candidate"] for t in sweeps["rmt-c1to2"]["trials"]] == [{"lr": 0.003}, {"lr": 0.0003}]
    assert len(sweeps["gradmem-c1to2"]["trials"]) == 4
    for name, record in sweeps.items():
        assert all(t["trained_steps"] == 4 for t in record["trials"])  # capped by --max-steps
        best = max(t["validation"]["em"] for t in record["trials"])
        assert record["picked_validation"]["em"] == best
        cell = next(c for c in summary["cells"] if c["cell"] == name)
        assert cell["lr"] == record["picked"]["lr"]
        assert cell["cell_config"]["train"]["optim"]["lr"] == record["picked"]["lr"]
        if "write_lr" in record["picked"]:
            assert cell["write_lr"] == record["picked"]["write_lr"]
    text = (tmp_path / "out" / "results.md").read_text()
    assert "Tuning (validation only" in text and "| gradmem-c1to2 |" in text
    caplog.set_level("INFO", logger="benchmarks.sweep")
    caplog.clear()
    again = compose.main(args)
    assert not [r for r in caplog.records if r.name == "benchmarks.sweep"] and again["complete"]
