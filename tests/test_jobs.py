"""The entrypoints run as users run them: a subprocess, a config file, flags."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_then_evaluate_then_resume(tmp_path):
    out = tmp_path / "run"
    run("jobs/train.py", "--config", "jobs/configs/kv_tiny.yaml", "--output", str(out), "--max-steps", "10")
    assert (out / "reader" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step_00000010").is_dir()
    proc = run("jobs/train.py", "--config", "jobs/configs/kv_tiny.yaml", "--output", str(out), "--max-steps", "12", "--resume")
    assert "resumed from" in proc.stderr and "step 12/12" in proc.stderr
    report = tmp_path / "eval.json"
    proc = run("jobs/evaluate.py", "--reader", str(out / "reader"), "--pairs", "1", "--steps", "0,2", "--samples", "64",
               "--json", str(report))
    data = json.loads(report.read_text())
    assert set(data["results"]) == {"0", "2"} and 0 <= data["results"]["2"]["em"] <= 1
    assert "exact match" in proc.stdout


def test_bad_config_fails_fast(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {attention: sdpa_flash}\n")
    proc = subprocess.run([sys.executable, "jobs/train.py", "--config", str(bad), "--output", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "second-order meta-training" in proc.stderr
