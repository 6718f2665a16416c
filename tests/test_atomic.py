"""The one atomic-write helper: files and directories appear whole or not at all, and a failure leaves no trace."""

from pathlib import Path

import pytest

from gradmem.atomic import TMP_PREFIX, atomic_path, write_atomic


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_file_is_replaced_whole(tmp_path):
    target = tmp_path / "sub" / "results.json"  # missing parents are created
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert _names(target.parent) == ["results.json"]  # no temporary left


def test_a_directory_replaces_a_directory(tmp_path):
    target = tmp_path / "best"
    for generation in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / f"{generation}.txt").write_text(generation)
            assert not (target / f"{generation}.txt").exists()  # invisible until the block ends
    assert _names(target) == ["new.txt"]  # the old content is gone, not merged
    assert _names(tmp_path) == ["best"]


def test_a_failure_keeps_the_old_content_and_cleans_up(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "good"
    assert _names(tmp_path) == ["checkpoint"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "never"):
            pass
    assert _names(tmp_path) == ["checkpoint"]


def test_a_file_and_a_directory_replace_each_other(tmp_path):
    target = tmp_path / "out"
    write_atomic(target, "a file")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("a directory")
    assert (target / "x").read_text() == "a directory"
    write_atomic(target, "a file again")
    assert target.read_text() == "a file again"


def test_temporaries_are_hidden_and_share_the_store_prefix(tmp_path):
    from gradmem import store

    with atomic_path(tmp_path / "manifest.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX) and tmp.name.endswith("manifest.json")
        tmp.write_text("{}")
    assert store.TMP_PREFIX == TMP_PREFIX  # the store's clean-up removes what a killed manifest write left
