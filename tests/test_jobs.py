"""The entrypoints run as users run them: a subprocess, a config file, flags, `ray job submit`."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradmem import Reader
from gradmem.tasks.kv import KVTask
from gradmem.train import evaluate

ROOT = Path(__file__).resolve().parents[1]


def run(args, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_ray_job_submit_then_evaluate(ray_cluster, tmp_path):
    """`ray job submit --working-dir . -- python jobs/train.py ...` against a running cluster, as in the README
    (2 workers, ZeRO-2), then jobs/evaluate.py on the exported reader: its figures are the library's."""
    env = {**ray_cluster["env"], "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    out = tmp_path / "reader"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster["dashboard"],
           "--working-dir", ".", "--", "python", "jobs/train.py", "--config", "jobs/configs/kv_tiny.yaml",
           "--num-workers", "2", "--deepspeed", "jobs/configs/ds_zero2.json", "--max-steps", "20",
           "--storage", str(tmp_path / "runs"), "--name", "submitted", "--output", str(out)]
    for _ in range(24):  # the dashboard's job agent may still be starting on a loaded machine: Ray says to retry
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and (tmp_path / "runs" / "submitted" / "step_00000020" / "reader").is_dir()
    assert (out / "model.safetensors").is_file()

    report = tmp_path / "eval.json"
    proc = run(["jobs/evaluate.py", "--reader", str(out), "--pairs", "1", "--steps", "0,2", "--samples", "64",
                "--json", str(report)])
    data = json.loads(report.read_text())
    assert set(data["results"]) == {"0", "2"}
    reader = Reader.from_pretrained(out)
    expected = evaluate(reader, KVTask(1), 64, [0, 2], reader.config.write_lr, seed=("evaluate", 0), batch_size=128)
    for k in (0, 2):
        assert data["results"][str(k)]["em"] == pytest.approx(expected[k]["em"])
        assert data["results"][str(k)]["token_acc"] == pytest.approx(expected[k]["token_acc"])
    assert "exact match" in proc.stdout


def test_bad_config_fails_fast(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {attention: sdpa_flash}\n")
    proc = subprocess.run([sys.executable, "jobs/train.py", "--config", str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "second-order meta-training" in proc.stderr
    proc = subprocess.run([sys.executable, "jobs/train.py", "--config", "jobs/configs/kv_tiny.yaml", "--deepspeed",
                           "jobs/configs/ds_zero3.json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "ZeRO stage 3 is not supported" in proc.stderr


def test_quiet_mode_sends_every_log_line_to_the_file_and_keeps_stdout_for_the_story(tmp_path):
    """What `make demo` relies on to print only its story: logs, warnings, native writes to fd 2 and the
    processes it starts all land in the log file; stdout is untouched."""
    log = tmp_path / "demo.log"
    script = f"""
import logging, os, subprocess, sys, warnings
sys.path.insert(0, {str(ROOT / 'jobs')!r})
from _common import send_stderr_to, setup_logging
setup_logging()
send_stderr_to(__import__('pathlib').Path({str(log)!r}))
print('the story')
logging.getLogger('ray.train').warning('a report line')
warnings.warn('a deprecation', DeprecationWarning, stacklevel=1)
os.write(2, b'native write\\n')
subprocess.run([sys.executable, '-c', 'import sys; sys.stderr.write("a child process\\\\n")'])
"""
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "the story\n" and proc.stderr == ""
    text = log.read_text()
    for line in ("a report line", "a deprecation", "native write", "a child process"):
        assert line in text, text
