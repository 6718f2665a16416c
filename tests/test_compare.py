"""The task comparison (benchmarks/compare.py) on its smoke configuration: bAbI qa1 with a tiny reader.

What is checked: the entrypoint trains and scores every method and writes results that parse, with the learning
curve taken from the Trainer's log and the generated answers scored with the task metric (recomputed here from
the stored answers); a rerun skips finished methods; two processes' worth of ``--only`` lists fill one output;
bad configs fail before training with a message that names the fault.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from benchmarks import compare
from benchmarks.compare import CompareConfig, run_compare
from gradmem.tasks import babi
from conftest import DATA, load_job, markdown_rows, needs_data

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "configs" / "compare_smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if not DATA:
        pytest.skip(needs_data.kwargs["reason"])
    out = tmp_path_factory.mktemp("compare") / "smoke"
    summary = compare.main(["--config", str(SMOKE), "--output", str(out), "--threads", "1", "--device", "cpu"])
    return out, summary


def test_every_method_is_trained_scored_and_reported(smoke_run):
    out, summary = smoke_run
    results = json.loads((out / "results.json").read_text())
    assert results == summary and results["complete"]
    assert [c["name"] for c in results["cells"]] == ["gradmem", "no_context"]
    test = babi.babi_task(["qa1"], "test", "en")
    for cell in results["cells"]:
        assert cell["test_samples"] == 24 and cell["budget"]["max_steps"] == 6
        # the learning curve is the Trainer's validation log: evaluations at steps 3 and 6
        assert [r["step"] for r in cell["curve"]["eval"]] == [3, 6]
        assert [r["step"] for r in cell["curve"]["train"]] == [2, 4, 6]
        assert cell["seconds_per_step"] > 0
        if cell["method"] == "gradmem":
            assert sorted(cell["teacher_forced"]) == ["1", "2"] and cell["k_train"] == 1
        else:
            assert list(cell["teacher_forced"]) == ["1"] and cell["k_train"] is None
        # the generated score is the task metric over the stored answers (first 8 kept for inspection)
        answers = [e["answer"] for e in cell["examples"]]
        assert [e["query"] for e in cell["examples"]] == [e.query for e in test.ordered(0, 8)]
        assert test.score(answers)["em"] == pytest.approx(
            sum(babi.exact_match(a, g[0]) for a, g in zip(answers, test.golds)) / 8)
        assert (out / "runs" / cell["name"] / "reader" / "config.json").exists()
        assert not (out / "runs" / cell["name"] / "checkpoints").exists()
    # the report's tables show each cell's own figures: test EM at the trained K, and the validation curve
    text = (out / "results.md").read_text()
    main_rows, curve_rows = markdown_rows(text, "| method | K train | alpha |"), markdown_rows(text, "| step |")
    for cell in results["cells"]:
        assert main_rows[f"{cell['name']} ({cell['method']})"]["teacher-forced EM"] == f"{100 * cell['em_trained']:.1f}"
        for record in cell["curve"]["eval"]:
            assert curve_rows[str(record["step"])][cell["name"]] == f"{100 * record['em']:.1f}"
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_methods_and_only_splits_the_work(smoke_run, tmp_path, caplog):
    out, summary = smoke_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    caplog.set_level("INFO", logger="benchmarks.compare")
    again = run_compare(CompareConfig.from_yaml(SMOKE), out)
    assert not [r for r in caplog.records if ": training " in r.getMessage()]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before
    assert [c["name"] for c in again["cells"]] == ["gradmem", "no_context"]

    # two "processes" with disjoint --only lists fill one directory; the report holds both once both are done
    split = tmp_path / "split"
    cfg = CompareConfig.from_yaml(SMOKE)
    first = run_compare(cfg, split, only=["no_context"])
    assert not first["complete"] and [c["name"] for c in first["cells"]] == ["no_context"]
    assert "INCOMPLETE: 1/2" in (split / "results.md").read_text()
    second = run_compare(cfg, split, only=["gradmem"])
    assert second["complete"] and [c["name"] for c in second["cells"]] == ["gradmem", "no_context"]
    # the same config and seeds give the same numbers as the single run
    assert [c["teacher_forced"] for c in second["cells"]] == [c["teacher_forced"] for c in summary["cells"]]


def test_a_finished_cell_of_another_config_is_refused(smoke_run, tmp_path):
    out, _ = smoke_run
    data = yaml.safe_load(SMOKE.read_text())
    data["memory"]["write_lr"] = 0.5
    with pytest.raises(ValueError, match="different config"):
        run_compare(CompareConfig.from_dict(data), out)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(task={"name": "kv"}), "benchmarks.capacity"),
    (lambda d: d.update(colour="red"), r"colour: unknown key \(a typo\?\)"),
    (lambda d: d["methods"].append({"name": "gradmem", "method": "gradmem"}), "unique"),
    (lambda d: d["methods"].append({"name": "x", "method": "lstm"}), "unknown method"),
    (lambda d: d["methods"].append({"name": "x", "method": "gradmem", "write_lr": {2: 0.1}}), r"methods\.2\.write_lr: must be a number"),
    (lambda d: d.update(test_split="train"), "test_split"),
    (lambda d: d.update(test_samples=0), "test_samples"),
    (lambda d: d["task"].update(tasks=["qa99"]), "qa1 .. qa20"),
    (lambda d: d.update(methods=[]), "at least one entry"),
])
def test_bad_configs_fail_before_training(change, message):
    data = copy.deepcopy(yaml.safe_load(SMOKE.read_text()))
    change(data)
    with pytest.raises(ValueError, match=message):
        CompareConfig.from_dict(data)


def test_only_must_name_configured_methods():
    with pytest.raises(ValueError, match="not in the config"):
        CompareConfig.from_yaml(SMOKE).select(["gradmem", "rmt"])


def test_evaluate_job_reproduces_the_comparison_scores(smoke_run, tmp_path):
    """jobs/evaluate.py on a trained bAbI reader gives the numbers the comparison recorded for it."""
    out, summary = smoke_run
    cell = next(c for c in summary["cells"] if c["name"] == "gradmem")
    result = load_job("evaluate").main(["--reader", str(out / "runs" / "gradmem" / "reader"), "--task", "babi", "--babi-set", "en",
                       "--babi-tasks", "qa1", "--samples", "24", "--steps", "1,2", "--generate",
                       "--max-new-tokens", "3", "--json", str(tmp_path / "eval.json")])
    assert result["samples"] == 24 and result["task"] == "babi-en-qa1-test"
    for k in ("1", "2"):
        assert result["results"][k]["em"] == pytest.approx(cell["teacher_forced"][k]["em"])
    assert result["generated"]["em"] == pytest.approx(cell["generated"]["em"])
    assert json.loads((tmp_path / "eval.json").read_text())["generated"] == result["generated"]


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "benchmarks" / "configs").glob("*.yaml")
                                          if p.name.startswith(("babi_", "squad_", "compare_"))))
def test_every_shipped_comparison_config_validates(config):
    """The CPU and GPU configurations parse and every method's TrainConfig validates (no training)."""
    cfg = CompareConfig.from_yaml(ROOT / "benchmarks" / "configs" / config)
    assert {s.method for s in cfg.methods} >= {"gradmem", "no_context"}
    for spec in cfg.methods:
        train = cfg.cell_config(spec)
        if train.model.pretrained:  # GPU and pretrained configs: the recipe's memory and WRITE (RMT: one forward write)
            k = 1 if spec.name == "rmt" else 2
            assert train.memory.num_memory == 8 and train.memory.write_steps == k and train.memory.mem_proj


def test_a_cell_recorded_before_a_new_config_field_still_counts(smoke_run, tmp_path):
    """A field added to TrainConfig later (here: optim.autocast, default None) does not invalidate finished cells."""
    import shutil

    out, _ = smoke_run
    copy_dir = tmp_path / "old"
    shutil.copytree(out / "cells", copy_dir / "cells")
    for path in (copy_dir / "cells").glob("*.json"):
        cell = json.loads(path.read_text())
        del cell["cell_config"]["train"]["optim"]["autocast"]
        path.write_text(json.dumps(cell))
    again = run_compare(CompareConfig.from_yaml(SMOKE), copy_dir)
    assert again["complete"] and len(again["cells"]) == 2


@needs_data
def test_contexts_longer_than_the_reader_accepts_fail_before_training(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data["memory"]["max_context_tokens"] = 20  # qa1 stories run to ~70 words
    with pytest.raises(ValueError, match="over memory.max_context_tokens = 20"):
        run_compare(CompareConfig.from_dict(data), tmp_path / "short")
    assert not (tmp_path / "short" / "runs" / "gradmem" / "metrics.jsonl").exists()  # nothing was trained
