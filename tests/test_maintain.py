"""Repair and upgrade jobs (pipelines/maintain.py, jobs/maintain.py) on a real local Ray, the upgrade on a real
S3-compatible server while a real Ray Serve service answers over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import requests
import torch

from conftest import make_reader, wait_for
from gradmem import Reader, WriteSetting, records
from gradmem.store import MemoryIndex, MemoryStore, current_memories
from gradmem.tasks.kv import KVTask, exact_match
from gradmem.runtime import free_port
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
    plan, already = plan_repair(store, reader.fingerprint, 1.01, WriteSetting(4, 0.5))  # everything is "weak"
    assert set(plan) == {("b", 0)} and already == 1  # "a" already carries the repair's setting


def _accuracies(table: pa.Table, values: list[float | None]) -> pa.Table:
    """A hand-made part: ``table`` with its recon_accuracy replaced by ``values`` (None: not recorded)."""
    column = table.schema.get_field_index("recon_accuracy")
    return table.set_column(column, table.schema.field(column).with_nullable(True), pa.array(values, pa.float32()))


def test_a_repair_plan_leaves_out_a_memory_whose_accuracy_is_not_recorded(tmp_path):
    """A hand-made part with a null recon_accuracy: nothing says the memory is weak, so the plan leaves it out
    (before, the comparison raised TypeError and the repair job ended in a traceback)."""
    reader = make_reader("llama")
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    texts = ["!ab:cd!|", "!ef:gh!|"]
    table = _accuracies(records.to_table(reader.write(texts, steps=1), ["a", "b"], reader.encode_contexts(texts)),
                        [None, 0.0])
    store.write_part("memories", table)
    plan, already = plan_repair(store, reader.fingerprint, 0.5, WriteSetting(4, 0.5))
    assert set(plan) == {("b", 0)} and already == 0


def test_a_store_takes_another_reader_only_by_upgrade_and_a_repair_never_binds_the_setting(tmp_path):
    from pipelines.compress import _check_output

    old, new = make_reader("llama"), make_reader("llama", seed=3)
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    ids = old.encode_contexts(["!ab:cd!|"])
    store.write_part("memories", records.to_table(old.write(["!ab:cd!|"], steps=2), ["a"], ids))
    store.write_part("memories", records.to_table(old.write(["!ab:cd!|"], steps=8), ["a"], ids, revisions=[1]))
    _check_output(store, old.spec, WriteSetting(2, 0.5))  # the repaired revision's setting does not bind the store
    with pytest.raises(ValueError, match="steps=2.*this run uses .* steps=8"):
        _check_output(store, old.spec, WriteSetting(8, 0.5))
    with pytest.raises(ValueError, match="maintain.py upgrade"):
        _check_output(store, new.spec, WriteSetting(2, 0.5))
    _check_output(store, new.spec, WriteSetting(2, 0.5), mode="upgrade")
    store.write_part("memories", records.to_table(new.write(["!ab:cd!|"]), ["a"], new.encode_contexts(["!ab:cd!|"])))
    store.write_served("reader-v2", new.fingerprint)  # after the upgrade: the new reader's store, the old one's refused
    _check_output(store, new.spec, WriteSetting(2, 0.5))
    with pytest.raises(ValueError, match=f"holds memories of reader {new.fingerprint}"):
        _check_output(store, old.spec, WriteSetting(2, 0.5))


def test_a_repair_with_a_reader_that_wrote_nothing_there_is_a_clear_error(tmp_path):
    make_reader("llama", seed=4).save_pretrained(tmp_path / "reader")
    cfg = CompressConfig(reader=str(tmp_path / "reader"), input=str(tmp_path / "corpus"), output=str(tmp_path / "store"),
                         steps=8)
    with pytest.raises(ValueError, match="holds no memories of reader .* the reader that wrote them"):
        repair(cfg, RepairConfig(below=0.9))
    with pytest.raises(ValueError, match="needs its write setting"):
        repair(CompressConfig(reader=cfg.reader, input=cfg.input, output=cfg.output), RepairConfig(below=0.9))


def test_a_replica_switches_only_to_the_reader_the_pointer_names(tmp_path):
    """pipelines/served.py in-process: no pointer, no switch; a pointer whose directory holds another reader
    than it names switches nothing; the right one switches once; a starting replica takes the pointer's reader."""
    from pipelines.served import PointerWatch, initial_reader, load_served

    for name, seed in (("old", 0), ("new", 3)):
        make_reader("llama", seed=seed).save_pretrained(tmp_path / name)
    old, new = (str(tmp_path / "old"), str(tmp_path / "new"))
    new_fp = Reader.from_pretrained(new).fingerprint
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    assert initial_reader(store, old) == (old, None)
    served = [load_served(old, store, None, "cpu")]
    watch = PointerWatch(store, None, "cpu", 0, lambda: served[-1].fingerprint, served.append)
    assert not watch.check()
    store.write_served(old, new_fp)  # names the new reader, points at the old one's directory
    with pytest.raises(ValueError, match="pointer names reader"):
        watch.check()
    store.write_served(new, new_fp)
    assert watch.check() and served[-1].fingerprint == new_fp and len(served) == 2 and not watch.check()
    assert initial_reader(store, old) == (new, new_fp)


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


def test_a_repair_completes_beside_weak_memories_the_input_cannot_rewrite_and_ones_without_an_accuracy(
        ray_cluster, kv_reader_dir, tmp_path):
    """A weak memory of a document the input does not hold (an online write) is reported ``not_in_input``, not
    ``remaining`` (before, every rerun said "not complete: rerun"), and a memory with a null accuracy no longer
    stops the report (before, a TypeError after the repaired parts were written, on every rerun)."""
    _kv_corpus(tmp_path / "in", 4, seed=43)
    out = tmp_path / "out"
    base = dict(reader=str(kv_reader_dir), input=str(tmp_path / "in"), output=str(out), greedy_check=False)
    assert compress(CompressConfig(**base, steps=1, lr=0.1))["complete"]
    reader = Reader.from_pretrained(kv_reader_dir)
    texts = ["!ab:cd!|", "!ef:gh!|"]
    table = _accuracies(records.to_table(reader.write(texts, steps=1, lr=0.1), ["online", "unmeasured"],
                                         reader.encode_contexts(texts)), [0.0, None])
    store = MemoryStore(pafs.LocalFileSystem(), str(out))
    store.write_part("memories", table)
    for _ in range(2):  # and its rerun
        report = repair(CompressConfig(**base, steps=8, lr=0.1), RepairConfig(below=1.0))
        assert report["complete"] and report["remaining"] == 0, report
        assert report["not_in_input"] == 1 and report["not_in_input_examples"] == [["online", 0]]


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


def _new_reader(src: Path, dst: Path) -> Reader:
    """A "newly trained" reader in miniature: the trained one with every weight nudged (another fingerprint,
    answers as good)."""
    reader = Reader.from_pretrained(src, trainable=True)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in reader.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    reader.save_pretrained(dst)
    return Reader.from_pretrained(dst)


class Asker(threading.Thread):
    """Queries the service twice a second, one document after another, recording every response: enough to see
    the switch from both sides, without a replica answering flat out on the cores the upgrade job needs (back to
    back, it took about one of this machine's two cores for the whole test)."""

    def __init__(self, base: str, docs: dict):
        super().__init__(daemon=True)
        self.base, self.docs, self.stop, self.seen = base, list(docs.items()), threading.Event(), []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            doc_id, ex = self.docs[i % len(self.docs)]
            try:
                r = requests.post(f"{self.base}/v1/query", json={"doc_id": doc_id, "questions": [ex.query],
                                                               "max_new_tokens": 4}, timeout=60)
                self.seen.append((doc_id, r.status_code, r.json()))
            except requests.RequestException as e:
                self.seen.append((doc_id, None, {"error": repr(e)}))
            i += 1
            time.sleep(0.5)

    def fingerprints(self) -> list[str]:
        return [body.get("reader_fingerprint") for _, _, body in self.seen]


def test_an_upgrade_killed_and_rerun_writes_every_document_once_while_the_service_switches_cleanly(
        ray_cluster, s3, kv_reader_dir, tmp_path):
    from ray import serve

    from test_compress import _wait_for_no_writers
    from pipelines.serve import build_app

    fs = s3.filesystem()
    prefix, out = f"gradmem-test/upgrade-corpus-{time.time_ns()}", f"gradmem-test/upgrade-memories-{time.time_ns()}"
    docs = _kv_corpus(tmp_path / "in", 64, seed=43)  # 16 writer calls of 4 (below): the kill lands after the first
    pafs.copy_files(str(tmp_path / "in"), prefix, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    old = Reader.from_pretrained(kv_reader_dir)
    new = _new_reader(kv_reader_dir, tmp_path / "reader_v2")
    assert new.fingerprint != old.fingerprint
    first = compress(CompressConfig(reader=str(kv_reader_dir), input=f"s3://{prefix}", output=f"s3://{out}",
                                    s3_endpoint=s3.endpoint, greedy_check=False))
    assert first["complete"] and first["memories"] == len(docs)
    store = MemoryStore(fs, out)
    legacy = "!qq:rr!|"  # a document only the old reader holds (an online write: not in the corpus)
    store.write_part("memories", records.to_table(old.write([legacy]), ["legacy"], old.encode_contexts([legacy])))

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options={"grpc_servicer_functions": []})
    try:
        serve.run(build_app({"reader": str(kv_reader_dir), "memories": f"s3://{out}", "s3_endpoint": s3.endpoint,
                             "refresh_interval_s": 0.0, "reader_check_interval_s": 0.5}), name="upgrade",
                  route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        asker = Asker(base, docs)
        asker.start()
        assert wait_for(lambda: len(asker.seen) >= 5, timeout=60, every=0.2)

        env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"], "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "jobs/maintain.py", "upgrade", "--reader", str(tmp_path / "reader_v2"), "--input",
               f"s3://{prefix}", "--output", f"s3://{out}", "--s3-endpoint", s3.endpoint, "--batch-size", "4",
               "--batches-per-call", "1", "--steps", "6", "--no-greedy-check"]
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)

        def new_rows() -> int:
            table = store.read_memories(["doc_id"])
            return sum(1 for fp in table.column("fingerprint").to_pylist() if fp == new.fingerprint)

        deadline = time.time() + 300
        while time.time() < deadline and job.poll() is None and not new_rows():
            time.sleep(0.25)  # each look reads the store's memories: a write call takes longer than this
        assert job.poll() is None, f"the upgrade ended before it could be killed:\n{job.stdout.read()[-3000:]}"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        _wait_for_no_writers(ray_cluster["address"])
        written = new_rows()
        assert 0 < written < len(docs) and store.served() is None  # killed half-way: nothing switched
        time.sleep(1.5)  # three pointer checks: the service stays on the old reader
        assert set(asker.fingerprints()) == {old.fingerprint}

        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
        summary = json.loads(second.stdout.strip().splitlines()[-1])
        assert summary["complete"] and summary["served"] == new.fingerprint, summary
        assert wait_for(lambda: new.fingerprint in asker.fingerprints()[-3:], timeout=60, every=0.2)
        settled = len(asker.seen)
        assert wait_for(lambda: len(asker.seen) >= settled + 5, timeout=60, every=0.2)
        asker.stop.set()
        asker.join(timeout=60)

        # every request answered, by the old reader until the switch and by the new one after, never a mix
        assert all(status == 200 for _, status, _ in asker.seen), [s for s in asker.seen if s[1] != 200][:3]
        order = asker.fingerprints()
        switch = order.index(new.fingerprint)
        assert 0 < switch and set(order[:switch]) == {old.fingerprint} and set(order[switch:]) == {new.fingerprint}
        mids = {(fp, d): mid for (fp, d, _, mid) in _rows(store)}
        for doc_id, _, body in asker.seen:
            assert body["memory_id"] == mids[(body["reader_fingerprint"], doc_id)]  # that reader's own memory
        em = [exact_match(body["answers"][0], docs[d].target) for d, _, body in asker.seen]
        assert sum(em) / len(em) > 0.8

        # the store: every document by the new reader exactly once, the old reader's memories untouched
        rows = _rows(store)
        assert sorted(d for (fp, d, _, _) in rows if fp == new.fingerprint) == sorted(docs)
        assert sorted(d for (fp, d, _, _) in rows if fp == old.fingerprint) == sorted([*docs, "legacy"])
        manifest = store.manifest()
        assert set(manifest["readers"]) == {old.fingerprint, new.fingerprint} and manifest["duplicates"] == 0
        assert manifest["served"]["fingerprint"] == new.fingerprint

        # a memory the served reader cannot read: 409 in the one error shape, naming the reader that wrote it
        for body in ({"doc_id": "legacy", "questions": ["?!qq:"]},
                     {"memory_id": mids[(old.fingerprint, "doc-000")], "questions": ["?!ab:"]}):
            r = requests.post(f"{base}/v1/query", json=body, timeout=60)
            assert r.status_code == 409 and set(r.json()) == {"error", "status"}, r.text
            assert old.fingerprint in r.json()["error"] and r.json()["status"] == 409
        health = requests.get(f"{base}/healthz", timeout=30).json()
        assert health["reader_fingerprint"] == new.fingerprint
    finally:
        serve.shutdown()
