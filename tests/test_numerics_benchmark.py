"""benchmarks.numerics: variants train from one config, finished variants are not rerun, the report compares."""

import json

import yaml

from benchmarks import numerics

TINY = {
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_positions": 128},
    "memory": {"num_memory": 2, "write_steps": 1, "write_lr": 0.5},
    "task": {"name": "kv", "pairs": 1},
    "optim": {"batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "max_steps": 4},
    "run": {"log_every": 2, "eval_every": 2, "eval_samples": 16, "eval_batch_size": 16, "save_every": 0, "stop_at_em": None},
}


def test_numerics_runs_each_variant_once_and_reports_gaps(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = ["--config", str(config), "--output", str(tmp_path / "out"), "--variants", "fp32_next_seed,bf16_autocast"]
    results = numerics.main(argv)
    assert set(results) == {"fp32", "fp32, next seed", "bf16 autocast"}
    for r in results.values():
        assert [s for s, _ in r["train"]] == [2, 4] and [s for s, _ in r["eval"]] == [2, 4]
    assert numerics.gap(results["fp32"]["train"], results["fp32"]["train"]) == 0
    assert numerics.gap(results["fp32, next seed"]["train"], results["fp32"]["train"]) > 0  # another seed, other losses
    done = tmp_path / "out" / "fp32" / "result.json"
    stamp = done.stat().st_mtime_ns
    again = numerics.main(argv)  # finished variants are read back, not trained again
    assert done.stat().st_mtime_ns == stamp and again["fp32"] == results["fp32"]
    report = (tmp_path / "out" / "results.md").read_text()
    assert "Seed yardstick" in report and (tmp_path / "out" / "numerics.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"]["bf16 autocast"]["overrides"] == {
        "optim": {"autocast": "bfloat16"}}
