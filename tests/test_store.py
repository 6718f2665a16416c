"""The memory store and the corpus parser against hostile and careless input, in-process (no Ray cluster): no
input runs code, no write replaces another document's part, one bad record or file never stops a reader or a
job. A property test drives random sequences of batch writes, online writes, twins, reruns and kills."""

from __future__ import annotations

import io
import json
import os
import pickle
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from gradmem import WriteSetting, records
from gradmem.memory import Memories, WriteStats
from gradmem.store import TMP_PREFIX, MemoryIndex, MemoryStore, part_name
from pipelines.compress import InputFile, parse, summarize

FP = "gm1-storetest"


def _table(docs: list[tuple[str, list[int]]], chunks: list[int] | None = None, n_chunks: list[int] | None = None,
           fingerprint: str = FP, write_time_s: float = 0.0) -> pa.Table:
    """Memory records for (doc_id, token ids) without a reader: the memory is a function of the tokens, as a WRITE's is."""
    n = len(docs)
    tensor = torch.stack([torch.full((2, 4), float(sum(t) * 31 + len(t))) for _, t in docs])
    mem = Memories(tensor, WriteStats(torch.zeros(n, 3), torch.ones(n), torch.tensor([len(t) for _, t in docs])),
                   fingerprint, WriteSetting(2, 0.5))
    return records.to_table(mem, [d for d, _ in docs], [t for _, t in docs], chunks=chunks, n_chunks=n_chunks,
                            write_time_s=write_time_s)


def _store(tmp_path: Path) -> MemoryStore:
    return MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))


def _parse(name: str, kind: str, data: bytes) -> list[dict]:
    f = InputFile(3, f"/x/{name}", kind, name)
    return parse(pa.table({"bytes": [data], "path": [f.path]}), {f.path: f}).to_pylist()


# ---------------------------------------------------------------------------------------------- item 1
class _Payload:
    """What an attacker pickles: unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def pickled_object_parquet(marker: Path) -> bytes:
    """A corpus file whose text column is Ray's pickled-object extension type holding the payload."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectType

    storage = pa.array([pickle.dumps(_Payload(marker))], type=pa.large_binary())
    text = pa.ExtensionArray.from_storage(ArrowPythonObjectType(), storage)
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": ["evil"], "text": text}), sink)
    return sink.getvalue()


def test_a_pickled_object_parquet_column_is_refused_unread(tmp_path):
    import ray.data  # noqa: F401 - registers Ray's extension types, as in a Ray Data worker

    marker = tmp_path / "pwned"
    data = pickled_object_parquet(marker)
    pq.read_table(io.BytesIO(data)).to_pylist()  # the attack is real: a naive reader runs the payload
    assert marker.exists()
    marker.unlink()

    (row,) = _parse("evil.parquet", "parquet", data)
    assert not marker.exists()
    assert row["reason"] == "malformed" and row["doc_id"] == "evil" and "extension" in row["message"]
    assert row["source"] == "evil.parquet#0"

    sink = io.BytesIO()  # other non-string columns: refused by type, every row an error, ids kept when readable
    pq.write_table(pa.table({"id": [1, 2], "text": [b"x", b"y"]}), sink)
    rows = _parse("bin.parquet", "parquet", sink.getvalue())
    assert [(r["doc_id"], r["reason"]) for r in rows] == [("1", "malformed"), ("2", "malformed")]
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(["a"], pa.large_string()), "text": pa.array(["ok"], pa.large_string())}), sink)
    assert [r["reason"] for r in _parse("large.parquet", "parquet", sink.getvalue())] == [None]


# ---------------------------------------------------------------------------------------------- items 3 and 9
def test_one_bad_record_is_one_error_row_and_error_rows_are_writable(tmp_path):
    deep = "[" * 2000 + "]" * 2000
    lines = [
        '{"id": "sur", "text": "ab\\ud800cd"}',  # a lone surrogate in the text
        '{"id": "x\\udfffy", "text": "fine"}',  # and in the id
        deep,  # RecursionError in json.loads
        '{"id": "deep", "text": ' + deep + "}",
        "",  # blank lines are not inputs
        "   ",
        json.dumps({"id": "i" * records.MAX_ID_CHARS, "text": "ok"}),
        json.dumps({"id": "j" * (records.MAX_ID_CHARS + 1), "text": "too long an id"}),
        json.dumps({"id": "good", "text": "hello"}),
    ]
    rows = _parse("bad.jsonl", "jsonl", "\n".join(lines).encode() + b"\n\n")
    got = [(r["source"], r["reason"]) for r in rows]
    assert got == [("bad.jsonl:1", "not_text"), ("bad.jsonl:2", "malformed"), ("bad.jsonl:3", "malformed"),
                   ("bad.jsonl:4", "malformed"), ("bad.jsonl:7", None), ("bad.jsonl:8", "malformed"),
                   ("bad.jsonl:9", None)]
    assert "characters: at most" in rows[5]["message"]
    errors = [{**r, "chunk": None, "n_chunks": None} for r in rows if r["reason"]]
    store = _store(tmp_path)
    store.write_part("errors", records.error_table(errors, FP))  # must not raise on the quoted surrogates
    back = store.read("errors")
    assert back.num_rows == 5 and "\\ud800" in back.column("excerpt")[0].as_py()
    raw = [{"source": "f:1", "doc_id": "a\ud800", "reason": "malformed", "message": "m\udc80", "excerpt": "\ud800"}]
    assert records.error_table(raw, FP).column("doc_id")[0].as_py() == "a\\ud800"  # escaped at the storage layer


def test_a_json_file_may_hold_an_array_or_json_lines():
    pretty = json.dumps([{"id": "a", "text": "one"}, {"id": "b", "text": "two"}, 7], indent=2).encode()
    rows = _parse("docs.json", "json", pretty)
    assert [(r["source"], r["doc_id"], r["reason"]) for r in rows] == [
        ("docs.json[0]", "a", None), ("docs.json[1]", "b", None), ("docs.json[2]", None, "malformed")]
    lines = b'{"id": "c", "text": "three"}\n\n{"id": "d", "text": "four"}\n'
    assert [(r["source"], r["doc_id"]) for r in _parse("more.json", "json", lines)] == [("more.json:1", "c"),
                                                                                      ("more.json:3", "d")]
    one = json.dumps({"id": "e", "text": "five"}, indent=2).encode()
    assert [(r["source"], r["doc_id"], r["text"]) for r in _parse("one.json", "json", one)] == [("one.json:1", "e", "five")]


# ---------------------------------------------------------------------------------------------- item 2
def test_twins_get_their_own_parts_rows_and_answers(tmp_path):
    store = _store(tmp_path)
    tokens = [5, 6, 7]
    first = store.write_part("memories", _table([("alice", tokens)]))
    second = store.write_part("memories", _table([("bob", tokens)]))  # same text, another document
    assert first != second and len(store.parts("memories")) == 2
    assert store.write_part("memories", _table([("alice", tokens)])) == first  # a retry: the same name, kept
    index = MemoryIndex(store)
    assert index.refresh() == 2
    a, b = index.entry(doc_id="alice"), index.entry(doc_id="bob")
    assert (a["doc_id"], b["doc_id"]) == ("alice", "bob") and a["memory_id"] == b["memory_id"]
    assert index.entry(memory_id=a["memory_id"])["doc_id"] in {"alice", "bob"}
    assert sorted(store.read("memories", ["doc_id"]).column("doc_id").to_pylist()) == ["alice", "bob"]


def test_publishing_never_replaces_a_file_and_bad_parts_are_skipped(tmp_path):
    store = _store(tmp_path)
    table = _table([("a", [1, 2]), ("b", [3])])
    squatter = Path(store.root) / "memories" / part_name("memories", table)
    squatter.parent.mkdir(parents=True)
    squatter.write_bytes(b"garbage that happens to carry the name")
    good = _table([("c", [4])])
    store.write_part("memories", good)
    real = Path(store.write_part("memories", _table([("d", [5])])))
    (real.parent / "part-truncated.parquet").write_bytes(real.read_bytes()[:-20])
    foreign = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}), foreign)
    (real.parent / "part-foreign.parquet").write_bytes(foreign.getvalue())

    path = store.write_part("memories", table)
    assert path != str(squatter) and squatter.read_bytes() == b"garbage that happens to carry the name"
    retry = _table([("a", [1, 2]), ("b", [3])], write_time_s=9.0)  # other bytes, the same rows
    assert store.write_part("memories", retry) == path  # the retry finds its own part under the alternative name

    fresh = MemoryStore(store.fs, store.root)
    assert sorted(fresh.read("memories", ["doc_id"]).column("doc_id").to_pylist()) == ["a", "b", "c", "d"]
    assert fresh.skipped_counts() == {"memories": 3, "errors": 0}
    index = MemoryIndex(MemoryStore(store.fs, store.root))
    assert index.refresh() == 4 and index.stats()["skipped_parts"] == 3
    assert index.entry(doc_id="c")["doc_id"] == "c"


def test_temporaries_of_killed_writers_are_cleaned_after_a_grace_period(tmp_path):
    store = _store(tmp_path)
    store.write_part("memories", _table([("a", [1])]))
    directory = Path(store.root) / "memories"
    old, fresh = directory / f"{TMP_PREFIX}dead-part-x.parquet", directory / f"{TMP_PREFIX}live-part-y.parquet"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert store.clean_temporaries() == 1 and not old.exists() and fresh.exists()


def test_s3_writes_abort_instead_of_publishing_a_truncated_part(s3):
    store = MemoryStore(s3.filesystem(), f"gradmem-test/store-{time.time_ns()}")
    store.fs.create_dir(f"{store.root}/memories")
    target = f"{store.root}/memories/part-broken.parquet"
    with pytest.raises(TypeError):
        store._put(target, object())  # fails inside the upload
    assert store.fs.get_file_info(target).type == pafs.FileType.NotFound
    assert not store.fs.get_file_info(pafs.FileSelector(f"{store.root}/memories"))  # nor a temporary left behind
    first = store.write_part("memories", _table([("alice", [1, 2])]))
    second = store.write_part("memories", _table([("bob", [1, 2])]))
    assert first != second and store.write_part("memories", _table([("alice", [1, 2])])) == first
    assert sorted(store.read("memories", ["doc_id"]).column("doc_id").to_pylist()) == ["alice", "bob"]


# ---------------------------------------------------------------------------------------------- item 4
def _inputs(rows: list[tuple[int, str, str | None]]) -> pa.Table:
    return pa.table({"order": [r[0] for r in rows], "source": [r[1] for r in rows], "doc_id": [r[2] for r in rows]})


def test_completeness_ignores_superseded_errors_and_online_writes(tmp_path):
    store = _store(tmp_path)
    inputs = _inputs([(0, "f:1", "long"), (1, "f:2", "short"), (2, "f:3", None)])
    error = {"source": "f:1", "doc_id": "long", "reason": "too_long", "message": "use --chunk", "chunk": None,
             "n_chunks": None}
    store.write_part("errors", records.error_table([error, {"source": "f:3", "reason": "malformed", "message": "x"}], FP))
    store.write_part("memories", _table([("short", [1])]))
    before = summarize(store, inputs)
    assert before["complete"] and before["errors"] == 2 and before["error_reasons"] == {"too_long": 1, "malformed": 1}

    store.write_part("memories", _table([("long", [1, 2]), ("long", [3])], chunks=[0, 1], n_chunks=[2, 2]))  # --chunk
    store.write_part("memories", _table([("online-doc", [9])]))  # the service wrote into the same store
    after = summarize(store, inputs)
    assert after["complete"] and after["errors"] == 1 and after["superseded_errors"] == 1
    assert after["error_reasons"] == {"malformed": 1} and after["other_memories"] == 1

    gap = summarize(store, _inputs([(0, "f:1", "long"), (5, "g:1", "never-written")]))
    assert not gap["complete"] and gap["missing"] == 1

    # a conflict (the id holds other content, so its document is complete) is never superseded: the user sees it
    clash = {"source": "f:2", "doc_id": "short", "reason": "conflict", "message": "other content", "chunk": None,
             "n_chunks": None}
    store.write_part("errors", records.error_table([clash], FP))
    shown = summarize(store, inputs)
    assert shown["error_reasons"] == {"malformed": 1, "conflict": 1} and shown["superseded_errors"] == 1


# ---------------------------------------------------------------------------------------------- property
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DOC_IDS = st.sampled_from(["a", "b", "c", "d", "e", "f"])
TEXTS = st.integers(0, 2)  # few texts: many documents share one (twins)
OPS = st.lists(st.one_of(
    st.tuples(st.just("batch"), st.lists(st.tuples(DOC_IDS, TEXTS), min_size=1, max_size=5), st.integers(0, 3)),
    st.tuples(st.just("online"), DOC_IDS, TEXTS),
    st.tuples(st.just("rerun"), st.integers(0, 20)),
    st.tuples(st.just("garbage"), st.binary(max_size=64)),
), min_size=1, max_size=12)


def _tokens(text: int) -> list[int]:
    return [text + 1] * (text + 2)


class _Model:
    """The store as a user sees it: which documents were accepted, with which text, and every part's bytes."""

    def __init__(self, root: str):
        self.store = MemoryStore(pafs.LocalFileSystem(), root)
        self.live = MemoryIndex(self.store)  # a long-running service's index, refreshed as it goes
        self.text: dict[str, int] = {}  # a document's text, fixed at its first use (a batch input's content)
        self.accepted: dict[str, int] = {}
        self.batches: list[list[tuple[str, int]]] = []
        self.seen: dict[str, bytes] = {}

    def batch(self, docs: list[tuple[str, int]], kill_after: int | None, retry_stamp: float = 0.0) -> None:
        """A compression run: skip what the store holds, write the rest in parts of two rows; a kill stops it
        after ``kill_after`` parts and leaves a temporary file; a retried part is written twice."""
        docs = [(d, self.text.setdefault(d, t)) for d, t in dict(docs).items()]
        self.batches.append(docs)
        have = set(row_keys_of(self.store))
        held = {(d, c): m for d, c, m in have}
        # the job's prepare: what the store holds is skipped, an id holding other content is a `conflict` error
        todo = [(d, t) for d, t in docs if (d, 0) not in held]
        for n, start in enumerate(range(0, len(todo), 2)):
            if kill_after is not None and n >= kill_after:
                directory = Path(self.store.root) / "memories"
                directory.mkdir(parents=True, exist_ok=True)
                (directory / f"{TMP_PREFIX}killed-part.parquet").write_bytes(b"PAR1 half a part")
                return
            rows = todo[start : start + 2]
            for stamp in (retry_stamp, retry_stamp + 1.0):  # the task's retry writes other bytes, same rows
                self.store.write_part("memories", _table([(d, _tokens(t)) for d, t in rows], write_time_s=stamp))
            self.accepted.update(rows)

    def online(self, doc_id: str, text: int) -> None:
        """The service's write: refused when the doc_id holds other content, a no-op when it holds this."""
        self.live.refresh()
        known = self.live.by_doc.get((doc_id, 0))
        if known is not None:
            return
        path = self.store.write_part("memories", _table([(doc_id, _tokens(text))]))
        self.live.add({"memory_id": _mid(text), "doc_id": doc_id, "chunk": 0, "n_chunks": 1, "part": path,
                       "fingerprint": FP})
        self.text.setdefault(doc_id, text)
        self.accepted[doc_id] = text

    def check(self) -> None:
        for path, body in self.seen.items():  # no part is ever replaced or removed
            assert Path(path).read_bytes() == body, f"{path} changed"
        for path in self.store.parts("memories"):
            self.seen.setdefault(path, Path(path).read_bytes())
        fresh = MemoryIndex(MemoryStore(self.store.fs, self.store.root))  # a service starting now
        fresh.refresh()
        self.live.refresh()
        for index in (fresh, self.live):
            assert index.conflicts == 0
            for doc_id, text in self.accepted.items():
                entry = index.entry(doc_id=doc_id)
                assert entry is not None and entry["doc_id"] == doc_id and entry["memory_id"] == _mid(text)
                row = pq.read_table(entry["part"]).filter(pa.compute.equal(pa.compute.field("doc_id"), doc_id))
                assert row.num_rows == 1
                _, memory = records.from_table(row)
                expected = _table([(doc_id, _tokens(text))]).column("memory").combine_chunks().to_numpy_ndarray()
                torch.testing.assert_close(memory.tensor, torch.from_numpy(expected.copy()))
        keys = row_keys_of(MemoryStore(self.store.fs, self.store.root))
        assert len(keys) == len(set(keys)), "a row was stored twice"


def _mid(text: int) -> str:
    return records.memory_id(FP, WriteSetting(2, 0.5), _tokens(text))


def row_keys_of(store: MemoryStore) -> list[tuple]:
    table = store.read("memories", ["doc_id", "chunk", "memory_id"])
    return [] if table is None else list(zip(*(table.column(c).to_pylist() for c in ("doc_id", "chunk", "memory_id"))))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_property_every_accepted_document_stays_answerable_with_its_own_doc_id(ops):
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        model = _Model(f"{root}/store")
        for n, op in enumerate(ops):
            if op[0] == "batch":
                model.batch(op[1], kill_after=op[2] if op[2] < 3 else None)
            elif op[0] == "online":
                model.online(op[1], op[2])
            elif op[0] == "rerun" and model.batches:  # the same input again, completing a killed run
                model.batch(model.batches[op[1] % len(model.batches)], kill_after=None, retry_stamp=5.0)
            elif op[0] == "garbage":  # a foreign file among the parts: skipped, never fatal
                directory = Path(model.store.root) / "memories"
                directory.mkdir(parents=True, exist_ok=True)
                (directory / f"part-foreign-{n}.parquet").write_bytes(op[1])
            model.check()
        model.store.clean_temporaries(grace_s=0)
        assert not list((Path(model.store.root) / "memories").glob(f"{TMP_PREFIX}*"))
        model.check()


class _CopyWithoutAnswer(pafs.FSSpecHandler):
    """The local disk behind an S3-like move whose answer never comes: the copy lands (or not), then the request
    times out, as the AWS SDK's does after 3 s of a busy server's silence."""

    def __init__(self, lands: bool):
        import fsspec

        super().__init__(fsspec.filesystem("file"))
        self.lands = lands

    def move(self, src, dest):
        if self.lands:
            self.copy_file(src, dest)
        raise OSError("AWS Error NETWORK_CONNECTION during CopyObject operation: curlCode: 28, Timeout was reached")


@pytest.mark.parametrize("lands", [True, False])
def test_a_publish_whose_copy_outlasts_its_request_succeeds_only_if_the_part_arrived_whole(lands, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr("gradmem.store.COPY_SETTLE_S", 0.2)
    store = MemoryStore(pafs.PyFileSystem(_CopyWithoutAnswer(lands)), str(tmp_path / "store"))
    table = _table([("a", [1, 2]), ("b", [3])])
    if lands:
        path = store.write_part("memories", table)
        assert path and pq.read_table(path, filesystem=store.fs).num_rows == 2
    else:
        with pytest.raises(OSError, match="CopyObject"):
            store.write_part("memories", table)
    left = sorted(p.name for p in (tmp_path / "store" / "memories").iterdir())
    assert not [n for n in left if n.startswith(TMP_PREFIX)], left  # no temporary object stays behind
    assert len(left) == (1 if lands else 0), left


def test_hand_made_parts_with_wrong_types_or_metadata_are_skipped_and_every_reader_of_the_store_still_works(tmp_path):
    """A part whose key column has another type (a list of doc ids, a text chunk number), whose schema metadata is
    not UTF-8, or whose metadata's (m, d) disagrees with its tensors is skipped and counted, as a garbage part is:
    the index, describe_readers and the reads of everything else go on (before, each stopped them all)."""
    from gradmem.store import describe_readers

    store = _store(tmp_path)
    store.write_part("memories", _table([("good", [1, 2])]))
    base = _table([("bad", [3])])
    folder = Path(store.root) / "memories"

    def plant(name: str, table: pa.Table) -> None:
        pq.write_table(table, folder / f"part-{name}.parquet")

    doc_lists = base.set_column(base.schema.get_field_index("doc_id"), "doc_id", pa.array([["bad"]]))
    plant("doc-lists", doc_lists)
    text_chunks = base.set_column(base.schema.get_field_index("chunk"), "chunk", pa.array(["x"]))
    plant("text-chunks", text_chunks)
    plant("meta-bytes", base.replace_schema_metadata({**base.schema.metadata, b"gradmem.\xff": b"\xff"}))
    plant("meta-shape", base.replace_schema_metadata({**base.schema.metadata, b"gradmem.m": b"7"}))
    plant("no-accuracy", base.drop_columns(["recon_accuracy"]))
    fresh = MemoryStore(store.fs, store.root)
    assert fresh.read("memories", ["doc_id"]).column("doc_id").to_pylist() == ["good"]
    reasons = fresh.skipped["memories"]
    assert len(reasons) == 5, reasons
    assert any("'doc_id' has type list" in r for r in reasons.values())
    assert any("not UTF-8" in r for r in reasons.values()) and any("(7, 4)" in r for r in reasons.values())
    index = MemoryIndex(MemoryStore(store.fs, store.root))
    assert index.refresh() == 1 and index.stats()["skipped_parts"] == 5
    assert describe_readers(MemoryStore(store.fs, store.root))[FP]["memories"] == 1


@pytest.mark.parametrize("name, content", [("manifest.json", b"[1]"), ("manifest.json", b"\xff{"),
                                           ("manifest.json", b'"text"'), ("served.json", b"5"),
                                           ("served.json", b'{"reader": 5, "fingerprint": "gm1-x"}')])
def test_a_manifest_or_pointer_that_is_not_a_json_object_is_one_clear_error(tmp_path, name, content):
    store = _store(tmp_path)
    store.write_part("memories", _table([("a", [1])]))
    (Path(store.root) / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"{name} in the store"):
        store.manifest() if name == "manifest.json" else store.served()
