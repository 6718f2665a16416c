"""`jobs/train.py --output DIR` replaces DIR with the exported reader: it must refuse a directory it did not write."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_job, make_reader
from pipelines.train import EXPORT_MARKER, check_output_dir, export_reader

ROOT = Path(__file__).resolve().parents[1]


def test_train_output_refuses_a_directory_it_did_not_write(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a reader exported by this tool"):
        check_output_dir(keep)
    with pytest.raises(SystemExit) as exited:  # the job refuses before any cluster or training
        load_job("train").main(["--config", str(ROOT / "jobs/configs/kv_tiny.yaml"), "--storage",
                                str(tmp_path / "runs"), "--output", str(keep)])
    assert exited.value.code == 2 and (keep / "thesis.tex").read_text() == "years of work"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="a file is there"):
        check_output_dir(tmp_path / "a-file")
    make_reader("llama").save_pretrained(tmp_path / "saved-by-hand")  # a reader, but not an export: kept
    with pytest.raises(FileExistsError, match="not a reader exported"):
        check_output_dir(tmp_path / "saved-by-hand")
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == (tmp_path / "empty").resolve()
    assert check_output_dir(tmp_path / "new") == (tmp_path / "new").resolve()


def test_an_export_replaces_only_a_previous_export(tmp_path):
    from ray.train import Checkpoint

    make_reader("llama").save_pretrained(tmp_path / "ckpt" / "reader")
    checkpoint = Checkpoint.from_directory(str(tmp_path / "ckpt"))
    out = export_reader(checkpoint, tmp_path / "out")
    assert (out / EXPORT_MARKER).is_file()
    (out / "stale.txt").write_text("from the previous export")
    assert not (export_reader(checkpoint, tmp_path / "out") / "stale.txt").exists()  # its own output: replaced
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        export_reader(checkpoint, keep)
    assert (keep / "notes.txt").read_text() == "keep me"
