"""Released-format data files that are malformed: one ValueError naming the file and what is wrong there, and
``jobs/evaluate.py`` answers it with one line and exit 2 (before, raw KeyError, TypeError and UnicodeDecodeError
tracebacks that named neither). No released data needed: the hostile files are written here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_job, make_reader
from gradmem.tasks import babi, squad

ROOT = Path(__file__).resolve().parents[1]
STORY = "1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Where is Mary?\tbathroom\t1\n"


def _babi_root(tmp_path: Path, text: str | bytes) -> Path:
    folder = tmp_path / "babi" / "en"
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("train", "test"):
        path = folder / f"qa1_single-supporting-fact_{part}.txt"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return tmp_path / "babi"


@pytest.mark.parametrize("text,message", [
    (STORY.replace("3 Where", "\u00b2 Where"), "expected 'ID text'"),  # isdigit() is true for "²", int() refuses it
    (STORY.replace("\t1\n", "\tone\n"), "supporting facts"),
    (STORY.replace("\t1\n", "\t9\n"), "supporting facts"),  # a line past the question
    (STORY.replace("\tbathroom\t", "\t\t"), "an answer"),
    ("1 Mary moved to the bathroom.\n", "no questions"),
    (STORY.encode().replace(b"Mary", b"M\xe4ry"), "not UTF-8 text"),  # Latin-1
])
def test_a_malformed_babi_file_is_one_error_naming_it(tmp_path, text, message):
    root = _babi_root(tmp_path, text)
    with pytest.raises(ValueError, match=message) as caught:
        babi.load_questions(["qa1"], "test", "en", root=root)
    assert "qa1_single-supporting-fact_test.txt" in str(caught.value)
    assert len(babi.load_questions(["qa1"], "test", "en", root=_babi_root(tmp_path / "ok", STORY))) == 1


GOOD = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "Mary moved.", "qas": [
    {"id": "q1", "question": "Who moved?", "answers": [{"text": "Mary", "answer_start": 0}]}]}]}]}


@pytest.mark.parametrize("content,message", [
    (json.dumps([GOOD]), "got a JSON list"),
    (json.dumps({"version": "1.1"}), "document.data: expected list, got NoneType"),
    (json.dumps({**GOOD, "data": []}), "no questions"),
    (json.dumps({**GOOD, "data": [{"paragraphs": []}]}), r"data\[0\].title: expected str"),
    (json.dumps(GOOD).replace('[{"text": "Mary", "answer_start": 0}]', '"Mary"'),
     r"data\[0\].paragraphs\[0\].qas\[0\].answers: expected list, got str"),
    (json.dumps(GOOD).replace('"answers": [{"text": "Mary", "answer_start": 0}]', '"answers": []'), "without an answer"),
    (json.dumps(GOOD)[:60], "Unterminated|Expecting"),
    (json.dumps(GOOD).replace("Mary moved", "M\u00e4ry moved").encode("latin-1"), "not UTF-8 text"),
])
def test_a_malformed_squad_file_is_one_error_naming_where(tmp_path, content, message):
    path = tmp_path / "dev.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as caught:
        squad.load_questions("train", path, validation_fraction=0.0, test_fraction=0.0)
    assert str(path) in str(caught.value)
    path.write_text(json.dumps(GOOD))
    assert len(squad.load_questions("train", path, validation_fraction=0.0, test_fraction=0.0)) == 1


def test_evaluate_answers_a_malformed_data_file_with_one_line_and_exit_2(tmp_path, capsys):
    make_reader("llama").save_pretrained(tmp_path / "reader")  # untrained: the refusal comes before any WRITE
    bad = tmp_path / "dev.json"
    bad.write_text(json.dumps({"version": "1.1"}))
    with pytest.raises(SystemExit) as stopped:
        load_job("evaluate").main(["--reader", str(tmp_path / "reader"), "--task", "squad", "--data", str(bad),
                                   "--steps", "1", "--samples", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and err[-1].startswith("evaluate: ") and str(bad) in err[-1]
    assert not any("Traceback" in line for line in err)


def test_train_refuses_a_malformed_babi_file_in_one_line_before_any_worker_starts(tmp_path):
    """Before, each Ray Train worker failed on the file and the job ended in a WorkerGroupError traceback."""
    root = _babi_root(tmp_path, STORY.replace("\t1\n", "\tone\n"))
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", "jobs/configs/kv_tiny.yaml", "--set", "task.name=babi",
         "--set", f"task.path={root}", "--set", "task.babi_set=en", "--storage", str(tmp_path / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err[-1].startswith("train: ") and "supporting facts" in err[-1], proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing started
