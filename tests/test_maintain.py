"""Repair and upgrade jobs (pipelines/maintain.py, jobs/maintain.py) on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from conftest import make_reader
from gradmem import Reader, records
from gradmem.store import MemoryIndex, MemoryStore, current_memories
from gradmem.tasks.kv import KVTask
from pipelines.compress import CompressConfig, compress, summarize
from pipelines.maintain import RepairConfig, plan_repair, repair

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- no Ray
def test_the_current_memory_is_the_highest_revision_for_each_reader(tmp_path):
    """A repaired memory (next revision, one new part) replaces the weak one for a live index, a fresh index and
    the store's counts at once; another reader's memories are listed, never served as this reader's."""
    reader, other = make_reader("llama"), make_reader("llama", seed=5)
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    texts = ["!ab:cd!|", "!ef:gh!|"]
    ids = reader.encode_contexts(texts)
    store.write_part("memories", records.to_table(reader.write(texts, steps=1), ["a", "b"], ids))
    store.write_part("memories", records.to_table(other.write(texts[:1]), ["a"], ids[:1]))
    live = MemoryIndex(store, fingerprint=reader.fingerprint)
    assert live.refresh() == 2 and live.written_by("a") == sorted([reader.fingerprint, other.fingerprint])
    weak = live.entry(doc_id="a")["memory_id"]

    fixed = records.to_table(reader.write(texts[:1], steps=4), ["a"], ids[:1], revisions=[1])
    store.write_part("memories", fixed)
    live.refresh()
    fresh = MemoryIndex(MemoryStore(store.fs, store.root), fingerprint=reader.fingerprint)
    fresh.refresh()
    for index in (live, fresh):
        entry = index.entry(doc_id="a")
        assert entry["memory_id"] == fixed.column("memory_id")[0].as_py() != weak and entry["revision"] == 1
        assert index.entry(doc_id="b")["revision"] == 0 and index.conflicts == 0
    foreign = MemoryIndex(store, fingerprint=other.fingerprint)
    foreign.refresh()
    assert foreign.entry(doc_id="b") is None and foreign.written_by("b") == [reader.fingerprint]

    current, duplicates = current_memories(store.read_memories(["doc_id", "chunk", "memory_id"]))
    mine = {r["doc_id"]: r for r in current.to_pylist() if r["fingerprint"] == reader.fingerprint}
    assert mine["a"]["revision"] == 1 and duplicates == 0 and current.num_rows == 3
    inputs = pa.table({"order": [0, 1], "source": ["f:1", "f:2"], "doc_id": ["a", "b"]})
    counts = summarize(store, inputs, reader.fingerprint)
    assert counts["complete"] and counts["memories"] == 2 and counts["duplicates"] == 0
    plan, already = plan_repair(store, reader.fingerprint, 1.01, (4, 0.5, None, 0))  # everything is "weak"
    assert set(plan) == {("b", 0)} and already == 1  # "a" already carries the repair's setting


# ---------------------------------------------------------------------------------------------- on Ray
def _kv_corpus(path: Path, n: int, seed: int) -> dict[str, object]:
    exs = KVTask(1).examples(n, seed=[seed, 1])
    docs = {f"doc-{i:03d}": e for i, e in enumerate(exs)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "docs.jsonl").write_text("\n".join(json.dumps({"id": d, "text": e.context}) for d, e in docs.items()))
    return docs


def _rows(store: MemoryStore) -> dict[tuple, dict]:
    """(fingerprint, doc_id, chunk, memory_id) -> the row's revision, setting and accuracy."""
    table = store.read_memories(["doc_id", "chunk", "memory_id", "write_steps", "recon_accuracy"])
    return {(r["fingerprint"], r["doc_id"], r["chunk"], r["memory_id"]): r for r in table.to_pylist()}


def test_repair_rewrites_only_the_weak_memories_and_a_rerun_changes_nothing(ray_cluster, kv_reader_dir, tmp_path):
    docs = _kv_corpus(tmp_path / "in", 24, seed=41)
    out = tmp_path / "out"
    base = dict(reader=str(kv_reader_dir), input=str(tmp_path / "in"), output=str(out), greedy_check=False)
    assert compress(CompressConfig(**base, steps=1, lr=0.1))["complete"]  # one small step: accuracies spread
    store = MemoryStore(pafs.LocalFileSystem(), str(out))
    before = _rows(store)
    accuracy = sorted(r["recon_accuracy"] for r in before.values())
    below = accuracy[len(accuracy) // 2]  # about half are weak
    weak = {k[1] for k, r in before.items() if r["recon_accuracy"] < below}
    assert 0 < len(weak) < len(docs), accuracy
    parts = set(store.parts("memories"))

    # the first repair reads an input where one weak document's text has changed since: that memory is left alone
    changed = sorted(weak)[0]
    edited = tmp_path / "edited"
    edited.mkdir()
    texts = {d: "!zz:zz!|" if d == changed else e.context for d, e in docs.items()}
    (edited / "docs.jsonl").write_text("\n".join(json.dumps({"id": d, "text": t}) for d, t in texts.items()))
    fix = dict(base, steps=8, lr=0.1)
    report = repair(CompressConfig(**{**fix, "input": str(edited)}), RepairConfig(below=below))
    assert (report["planned"], report["rewritten"], report["stale"]) == (len(weak), len(weak) - 1, 1)
    assert report["stale_examples"] == [[changed, 0]] and report["complete"]  # done what it could: reported
    report = repair(CompressConfig(**fix), RepairConfig(below=below))  # the original input: the last one
    assert (report["planned"], report["rewritten"], report["stale"], report["complete"]) == (1, 1, 0, True)

    after = _rows(store)
    assert set(store.parts("memories")) >= parts and {k: after[k] for k in before} == before  # nothing replaced
    new = {k: r for k, r in after.items() if k not in before}
    assert sorted(k[1] for k in new) == sorted(weak)  # exactly the weak ones, once each
    assert all(r["revision"] == 1 and r["write_steps"] == 8 for r in new.values())
    index = MemoryIndex(store, fingerprint=Reader.from_pretrained(kv_reader_dir).fingerprint)
    index.refresh()
    for (_, doc_id, _, mid) in new:
        assert index.entry(doc_id=doc_id)["memory_id"] == mid  # the repaired memory is the one served
    manifest = store.manifest()
    assert manifest["last_repair"]["rewritten"] == 1 and manifest["duplicates"] == 0

    parts = set(store.parts("memories"))
    again = repair(CompressConfig(**fix), RepairConfig(below=below))
    assert again["planned"] == 0 and again["rewritten"] == 0
    assert set(store.parts("memories")) == parts and store.manifest() == manifest  # a rerun changes nothing
    rerun = compress(CompressConfig(**base, steps=1, lr=0.1))  # the compression itself, rerun after the repair
    assert rerun["complete"] and rerun["this_run"]["memories"] == 0 and rerun["duplicates"] == 0
    assert rerun["memories"] == len(docs) and set(store.parts("memories")) == parts
