"""Batch compression: parsing and validation in-process, then the Ray Data job on a real local Ray with a
real S3-compatible server (SeaweedFS), including a kill and restart."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from gradmem import Reader, WriteSetting, records
from gradmem.chunking import Chunking, recorded
from gradmem.data import tokenize
from gradmem.store import MemoryStore
from gradmem.tasks.kv import KVTask, exact_match
from conftest import make_reader, exported_names, scrape, unmoved, wait_for
from pipelines import metrics
from pipelines.compress import _PARSED, CompressConfig, InputFile, compress, parse, prepare, resolve_duplicates

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- no Ray
def _parse(name: str, kind: str, data: bytes) -> list[dict]:
    f = InputFile(3, f"/x/{name}", kind, name)
    return parse(pa.table({"bytes": [data], "path": [f.path]}), {f.path: f}).to_pylist()


def test_jsonl_records_keep_their_line_and_every_bad_line_a_reason():
    lines = [{"id": "a", "text": "hello"}, "{oops", [1, 2], {"text": "no id"}, {"id": "b"}, {"id": "c", "text": None},
             {"id": 7, "text": "int ids are fine"}, {"id": True, "text": "bool ids are not"}, {"id": "", "text": "x"}]
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"
    rows = _parse("part.jsonl", "jsonl", data)
    assert [r["source"] for r in rows] == [f"part.jsonl:{i}" for i in range(1, 10)]
    assert [r["reason"] for r in rows] == [None, "malformed", "malformed", "malformed", "malformed", "not_text", None,
                                           "malformed", "malformed"]
    assert rows[6]["doc_id"] == "7" and rows[0]["text"] == "hello"
    assert rows[0]["order"] == (3 << 32) and rows[6]["order"] == (3 << 32) | 6
    assert "{oops" in rows[1]["excerpt"]


def test_parquet_and_text_files():
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", None, "c"], "text": ["x", "y", None]}), sink)
    rows = _parse("p.parquet", "parquet", sink.getvalue())
    assert [(r["source"], r["reason"]) for r in rows] == [("p.parquet#0", None), ("p.parquet#1", "malformed"),
                                                          ("p.parquet#2", "not_text")]
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), sink)
    (row,) = _parse("q.parquet", "parquet", sink.getvalue())
    assert row["reason"] == "malformed" and "text" in row["message"]
    (row,) = _parse("r.parquet", "parquet", b"not parquet at all")
    assert row["reason"] == "malformed" and "unreadable" in row["message"]
    (row,) = _parse("sub/doc 1.txt", "txt", "café".encode())
    assert row["doc_id"] == "sub/doc 1" and row["text"] == "café"
    (row,) = _parse("bin.txt", "txt", b"\xff\xfe\x00")
    assert row["reason"] == "not_text"


def test_one_bad_element_of_a_json_array_is_its_own_error_and_the_others_are_read():
    """A .json array that does not parse as a whole (an element nested too deeply, an integer over Python's limit,
    a byte that is not UTF-8), pretty-printed or not, with or without a byte-order mark: every other element is
    read, the bad one is its own error row, and data after the array is one more."""
    good = [json.dumps({"id": f"arr{i}", "text": f"t{i}"}, indent=2).encode() for i in range(3)]
    for bad in (b"[" * 100_000 + b"]" * 100_000, b'{"id": "big", "text": "x", "n": ' + b"9" * 5000 + b"}",
                b'{"id": "u", "text": "a\xffb"}'):
        for bom in (b"", b"\xef\xbb\xbf"):
            rows = _parse("a.json", "json", bom + b"[" + b",\n".join([*good[:2], bad, good[2]]) + b"]")
            assert [(r["source"], r["doc_id"], r["reason"]) for r in rows] == [
                ("a.json[0]", "arr0", None), ("a.json[1]", "arr1", None), ("a.json[2]", None, "malformed"),
                ("a.json[3]", "arr2", None)], rows
    rows = _parse("b.json", "json", b"\xef\xbb\xbf" + json.dumps([{"id": "a", "text": "x"}]).encode() + b" trailing")
    assert [(r["source"], r["doc_id"], r["reason"]) for r in rows] == [("b.json[0]", "a", None),
                                                                       ("b.json[1]", None, "malformed")]
    assert _parse("c.json", "json", b"\xef\xbb\xbf" + json.dumps([{"id": "a", "text": "x"}]).encode())[0]["doc_id"] == "a"
    assert _parse("e.json", "json", b"[ ]") == []


def test_a_parquet_value_that_is_not_utf8_is_its_own_error():
    """pyarrow does not check UTF-8 when it reads: one bad value is its row's error, the file's other rows are read."""
    def strings(*values: bytes) -> pa.Array:
        return pa.array(values, pa.binary()).view(pa.string())  # bytes as they may sit in a file

    sink = io.BytesIO()
    pq.write_table(pa.table({"id": strings(b"good", b"bad-text", b"\xffid"), "text": strings(b"ok", b"\xff\xfe", b"x")}),
                   sink)
    rows = _parse("p.parquet", "parquet", sink.getvalue())
    assert [(r["doc_id"], r["reason"]) for r in rows] == [("good", None), ("bad-text", "not_text"), (None, "malformed")]
    assert rows[0]["text"] == "ok" and "UTF-8" in rows[1]["message"] and "UTF-8" in rows[2]["message"]


def test_an_input_directory_reads_regular_files_only_and_follows_no_link(tmp_path):
    """Links inside the input directory (to a file or folder outside it, to /, to the directory itself), a FIFO
    and a file name that is not UTF-8 are each listed once as refused, unread (the job makes each an error row:
    ``unread_rows``); regular files are read; the walk never leaves the directory."""
    from pipelines.compress import _odd_name, list_inputs, unread_rows

    corpus, outside = tmp_path / "in", tmp_path / "outside"
    (corpus / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the store")
    (corpus / "ok.jsonl").write_text('{"id": "ok", "text": "hello"}\n')
    (corpus / "sub" / "b.txt").write_text("x")
    (corpus / "leak.txt").symlink_to(outside / "secret.txt")
    (corpus / "linkdir").symlink_to(outside)
    (corpus / "root").symlink_to("/")
    (corpus / "sub" / "loop").symlink_to(corpus)
    (corpus / "tab\tname.jsonl").write_text('{"id": "t", "text": "x"}\n')  # Ray's paths drop control characters
    os.mkfifo(corpus / "fifo.jsonl")
    with open(os.path.join(os.fsencode(corpus), b"bad\xffname.txt"), "wb"):  # a name that is not UTF-8
        pass
    _, files = list_inputs(str(corpus))
    listed = {records.safe_text(f.name): f.refused for f in files}
    assert sorted(listed) == ["bad\\udcffname.txt", "fifo.jsonl", "leak.txt", "linkdir", "ok.jsonl", "root", "sub/b.txt",
                              "sub/loop", "tab\tname.jsonl"]
    assert listed["ok.jsonl"] is None and listed["sub/b.txt"] is None
    assert all("symbolic link" in listed[n] for n in ("leak.txt", "linkdir", "root", "sub/loop"))
    assert "regular file" in listed["fifo.jsonl"] and "UTF-8" in listed["bad\\udcffname.txt"]
    assert "control character" in listed["tab\tname.jsonl"]
    assert _odd_name("in/a\ufffdb.txt", s3=True) and _odd_name("in/a\ufffdb.txt", s3=False) is None  # S3 lost a byte
    rows = unread_rows(files).to_pylist()
    assert len(rows) == 7 and {r["reason"] for r in rows} == {"malformed"} and all(r["text"] is None for r in rows)


def test_prepare_validates_chunks_dedups_and_skips_what_exists(kv_reader_dir):
    reader = Reader.from_pretrained(kv_reader_dir)
    spec = reader.spec
    ctx = KVTask(1).examples(1, seed=0)[0].context  # 8 characters = 8 tokens
    long_text = ctx * 40  # 320 tokens > max_context_tokens
    batch = pa.Table.from_pylist([
        {"order": 0, "source": "f:1", "doc_id": "a", "text": ctx},
        {"order": 1, "source": "f:2", "doc_id": "b", "text": "  \n"},
        {"order": 2, "source": "f:3", "doc_id": "c", "text": long_text},
        {"order": 3, "source": "f:4", "doc_id": "a", "text": ctx + ctx},
        {"order": 4, "source": "f:5", "doc_id": None, "text": None, "reason": "malformed", "message": "bad"},
    ], schema=_PARSED)
    kwargs = dict(reader_uri=str(kv_reader_dir), s3_endpoint=None, spec=spec.__dict__, setting=WriteSetting(2, 0.5),
                  existing_ref=(set(), set(), {}))
    duplicates = {"a": (0, "f:1")}
    prepared = prepare(batch, chunk=False, **kwargs)
    rows = prepared.to_pylist()  # every record has a row, duplicates not yet resolved (they need every id)
    assert [(r["doc_id"], r["status"], r["reason"]) for r in rows] == [
        ("a", "write", None), ("b", "error", "empty"), ("c", "error", "too_long"), ("a", "write", None),
        (None, "error", "malformed")]
    assert rows[0]["token_ids"] == reader.encode_contexts([ctx])[0]
    assert rows[0]["memory_id"] == records.memory_id(spec.fingerprint, WriteSetting(2, 0.5), rows[0]["token_ids"])
    resolved = resolve_duplicates(prepared, duplicates, (set(), set(), {})).to_pylist()
    assert [(r["doc_id"], r["status"], r["reason"]) for r in resolved] == [
        ("a", "write", None), ("b", "error", "empty"), ("c", "error", "too_long"), ("a", "error", "duplicate_id"),
        (None, "error", "malformed")]
    assert "first used at f:1" in resolved[3]["message"] and resolved[3]["excerpt"] == (ctx + ctx)[:200]

    chunked_table = prepare(batch, chunk=True, **kwargs)
    chunked = [r for r in chunked_table.to_pylist() if r["doc_id"] == "c"]
    limit = spec.max_context_tokens
    assert [(r["chunk"], r["n_chunks"]) for r in chunked] == [(i, 4) for i in range(4)]  # 320 tokens, 100 a chunk
    assert sum(len(r["token_ids"]) for r in chunked) == 320 and all(len(r["token_ids"]) <= limit for r in chunked)
    # a duplicate of a chunked document is one error, even with its chunks split over batches
    twice = pa.concat_tables([chunked_table.slice(0, 3), chunked_table.slice(3)])
    split = [resolve_duplicates(t, {"c": (-1, "g:1")}, (set(), set(), {})).to_pylist() for t in (twice.slice(0, 3),
                                                                                               twice.slice(3))]
    assert [r["reason"] for part in split for r in part if r["doc_id"] == "c"] == ["duplicate_id"]
    # the job's chunk size and overlap: 320 tokens in chunks of 60 every 40 tokens
    overlapping = prepare(batch, chunk=True, chunking=Chunking(tokens=60, overlap=20), **kwargs).to_pylist()
    pieces = [r["token_ids"] for r in overlapping if r["doc_id"] == "c"]
    assert pieces == Chunking(tokens=60, overlap=20).split(tokenize(reader.tokenizer, [long_text])[0])
    assert len(pieces) == 8
    assert [r["n_chunks"] for r in overlapping if r["doc_id"] == "c"] == [8] * 8

    done = {("a", 0, rows[0]["memory_id"])}, {records.error_id("f:2", "b", None, "empty")}, {"a": {1}}
    again = prepare(batch, chunk=False, **{**kwargs, "existing_ref": done})
    assert [(r["doc_id"], r["status"]) for r in again.to_pylist()][:2] == [("a", "held"), ("b", "held")]
    resolved = resolve_duplicates(again, duplicates, done).to_pylist()
    assert [(r["doc_id"], r["reason"]) for r in resolved] == [("c", "too_long"), ("a", "duplicate_id"),
                                                              (None, "malformed")]

    # an id the store holds with other content (an online write) is a conflict error, never a second memory
    clash = {("a", 0, "0" * 32)}, set(), {"a": {1}}
    rows = prepare(batch, chunk=False, **{**kwargs, "existing_ref": clash}).to_pylist()
    assert (rows[0]["doc_id"], rows[0]["status"], rows[0]["reason"]) == ("a", "error", "conflict")
    assert "already holds another memory" in rows[0]["message"] and rows[0]["memory_id"] is None

    # a text that chunks into another count is another text, even when its first chunks equal the stored ones:
    # "c" stored as its 4 chunks of 100 tokens, then a longer text whose first 4 chunks are those (it grew) or a
    # shorter one made of its first chunk (it shrank); neither mixes with nor hides behind the stored document
    stored = {("c", r["chunk"], r["memory_id"]) for r in chunked}, set(), {"c": {4}}
    for text in (long_text + ctx * 20, long_text[:100]):
        grown = pa.Table.from_pylist([{"order": 9, "source": "f:9", "doc_id": "c", "text": text}], schema=_PARSED)
        (row,) = prepare(grown, chunk=True, **{**kwargs, "existing_ref": stored}).to_pylist()
        assert (row["status"], row["reason"]) == ("error", "conflict") and "4 chunk(s)" in row["message"], row
    same = pa.Table.from_pylist([{"order": 9, "source": "f:9", "doc_id": "c", "text": long_text}], schema=_PARSED)
    assert {r["status"] for r in prepare(same, chunk=True, **{**kwargs, "existing_ref": stored}).to_pylist()} == {"held"}


def test_store_parts_are_content_named_and_atomic(tmp_path):
    reader = make_reader("llama")
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    mem = reader.write(["!ab:cd!|", "!ef:gh!|"])
    table = records.to_table(mem, ["x", "y"], reader.encode_contexts(["!ab:cd!|", "!ef:gh!|"]))
    first = store.write_part("memories", table)
    assert store.write_part("memories", table) == first  # the same rows land on the same name
    assert store.parts("memories") == [first] and store.write_part("memories", table.slice(0, 0)) is None
    (tmp_path / "store" / "memories" / ".tmp-unfinished.parquet").write_bytes(b"half")  # what a crash leaves
    assert store.parts("memories") == [first]
    assert store.read("memories", ["doc_id"]).column("doc_id").to_pylist() == ["x", "y"]
    store.write_manifest({"inputs": 2})
    assert store.manifest() == {"inputs": 2} and not list((tmp_path / "store").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- on Ray + S3
BAD = {  # doc id -> (text or raw line, expected reason)
    "empty": ("", "empty"), "blank": ("   \n\t", "empty"), "long": ("!ab:cd!|" * 40, "too_long"),
    "number": (12345, "not_text"), "nan": ("!ab:cd!#|", "non_finite"),  # '#' is <unk>, poisoned below
}


def _corpus(fs, prefix: str, n: int) -> tuple[list, dict]:
    """n good KV documents over three jsonl shards and a Parquet file, plus one bad record of every kind."""
    exs = KVTask(1).examples(n, seed=[11, 5])
    docs = [(f"doc-{i:04d}", e) for i, e in enumerate(exs)]
    lines = [json.dumps({"id": d, "text": e.context}) for d, e in docs[: n - 40]]
    lines += [json.dumps({"id": k, "text": t}) for k, (t, _) in BAD.items()]
    late = ["{this is not json", json.dumps({"text": "no id"}), json.dumps({"id": "notext"}),
            json.dumps({"id": "doc-0001", "text": "!zz:zz!|"})]  # a duplicate id, later in the input
    for s in range(3):
        with fs.open_output_stream(f"{prefix}/shard-{s}.jsonl") as f:
            f.write(("\n".join(lines[s::3]) + "\n").encode())
    with fs.open_output_stream(f"{prefix}/zz-late.jsonl") as f:  # sorts after every other file
        f.write("\n".join(late).encode())  # no final newline: the last record still counts
    lines += late
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": [d for d, _ in docs[n - 40:]], "text": [e.context for _, e in docs[n - 40:]]}), sink)
    with fs.open_output_stream(f"{prefix}/tail.parquet") as f:
        f.write(sink.getvalue())
    with fs.open_output_stream(f"{prefix}/_SUCCESS") as f:  # a marker file: skipped, not an input
        f.write(b"")
    return docs, {"inputs": len(lines) + 40, "errors": len(BAD) + 4}


def _poisoned_reader(src: Path, dst: Path) -> Reader:
    """The trained reader with the <unk> embedding set to NaN: any text with a character outside the KV alphabet
    makes a NaN WRITE (a corrupted checkpoint in miniature), everything else writes as before."""
    reader = Reader.from_pretrained(src, trainable=True)
    unk = reader.tokenizer.unk_token_id
    head = reader.lm.get_output_embeddings()
    if head.weight is reader.lm.get_input_embeddings().weight:  # tied (the recipe's default): untie first, so the
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # poison reaches inputs only, not answers
        reader.lm.config.tie_word_embeddings = False
    with torch.no_grad():
        reader.lm.get_input_embeddings().weight[unk] = float("nan")
    reader.save_pretrained(dst)
    return Reader.from_pretrained(dst)


def _store_tables(fs, root: str):
    store = MemoryStore(fs, root)
    return store, store.read("memories"), store.read("errors")


def test_s3_to_s3_every_record_accounted_for_memories_match_and_answer(ray_cluster, s3, kv_reader_dir, tmp_path):
    fs = s3.filesystem()
    prefix, out = f"gradmem-test/corpus-{time.time_ns()}", f"gradmem-test/memories-{time.time_ns()}"
    docs, expected = _corpus(fs, prefix, n=240)
    reader = _poisoned_reader(kv_reader_dir, tmp_path / "reader")
    pafs.copy_files(str(tmp_path / "reader"), f"{prefix}-reader", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)  # the reader too comes from S3: every actor downloads it
    cfg = CompressConfig(reader=f"s3://{prefix}-reader", input=f"s3://{prefix}", output=f"s3://{out}",
                         batch_size=16, actors=2, s3_endpoint=s3.endpoint)
    manifest = compress(cfg)
    assert manifest["complete"] and manifest["inputs"] == expected["inputs"]
    assert manifest["memories"] == len(docs) and manifest["errors"] == expected["errors"]
    assert manifest["error_reasons"] == {"empty": 2, "too_long": 1, "not_text": 1, "non_finite": 1, "malformed": 3,
                                         "duplicate_id": 1}
    assert manifest["reader_fingerprint"] == reader.fingerprint

    store, mem, err = _store_tables(fs, out)
    by_reason = {r["reason"]: r for r in err.to_pylist()}
    assert by_reason["duplicate_id"]["doc_id"] == "doc-0001" and "shard-" in by_reason["duplicate_id"]["message"]
    assert by_reason["non_finite"]["doc_id"] == "nan"
    assert sorted(mem.column("doc_id").to_pylist()) == [d for d, _ in docs]  # each good document exactly once

    ids, memories = records.from_table(mem, reader.fingerprint)
    texts = dict((d, e.context) for d, e in docs)
    local = reader.write([texts[i] for i in ids])  # the same documents, in-process, other batches
    torch.testing.assert_close(memories.tensor, local.tensor, atol=1e-4, rtol=1e-4)
    assert mem.column("memory_id").to_pylist() == records.to_table(local, ids, reader.encode_contexts(
        [texts[i] for i in ids])).column("memory_id").to_pylist()
    assert all(0 <= g <= 1 for g in mem.column("recon_greedy").to_pylist())
    questions = {d: (e.query, e.target) for d, e in docs}
    answers = reader.answer(memories, [questions[i][0] for i in ids], max_new_tokens=4)
    em = sum(exact_match(a, questions[i][1]) for a, i in zip(answers, ids)) / len(ids)
    assert em > 0.8, em

    # the same command again: nothing new, nothing lost, and no writer actor started (no reader loaded)
    parts = store.parts("memories") + store.parts("errors")
    writers = _writer_actors(ray_cluster["address"])
    again = compress(cfg)
    assert again["this_run"]["memories"] == 0 and again["this_run"]["errors"] == 0 and again["complete"]
    assert store.parts("memories") + store.parts("errors") == parts
    assert _writer_actors(ray_cluster["address"]) == writers


def _writer_actors(address: str) -> set[str]:
    """Ids of every MemoryWriter actor the cluster has seen, dead or alive."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=address, limit=10_000) if "MemoryWriter" in a.class_name}


def test_an_output_that_is_a_file_or_holds_one_as_a_part_folder_is_refused_before_any_work(tmp_path):
    """Before, the WRITEs ran and the writer actor's first part write failed the job with an actor traceback."""
    from pipelines.compress import open_run

    kv_reader_dir = tmp_path / "reader"  # untrained: only its spec is read
    make_reader("llama").save_pretrained(kv_reader_dir)

    for where in ("out", "out/memories", "out/errors"):
        out = tmp_path / where.replace("/", "_")
        path = tmp_path / where.replace("out", out.name, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a file")
        with pytest.raises(ValueError, match="is a file, not a folder of a memory store"):
            open_run(CompressConfig(reader=str(kv_reader_dir), input=str(tmp_path), output=str(out)))
    open_run(CompressConfig(reader=str(kv_reader_dir), input=str(tmp_path), output=str(tmp_path / "fresh")))


def test_an_output_store_belongs_to_one_reader_and_setting(ray_cluster, kv_reader_dir, tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text("!ab:cd!|")
    out = tmp_path / "out"
    assert compress(CompressConfig(reader=str(kv_reader_dir), input=str(corpus), output=str(out)))["complete"]
    (out / "manifest.json").unlink()  # as if the first run was killed before its manifest: the parts still bind
    with pytest.raises(ValueError, match="steps=2, lr=0.5, target=None, min_steps=0, precision=float32; this run uses .* steps=3"):
        compress(CompressConfig(reader=str(kv_reader_dir), input=str(corpus), output=str(out), steps=3))
    with pytest.raises(ValueError, match="precision=float32; this run uses .* precision=bfloat16"):
        compress(CompressConfig(reader=str(kv_reader_dir), input=str(corpus), output=str(out), precision="bfloat16"))
    make_reader("llama").save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="Use another --output"):
        compress(CompressConfig(reader=str(tmp_path / "other"), input=str(corpus), output=str(out)))
    # an adaptive write is another setting: refused here, written (and rerun as a no-op) into its own store
    adaptive = dict(reader=str(kv_reader_dir), input=str(corpus), target_accuracy=1.0, min_steps=1, steps=4)
    with pytest.raises(ValueError, match="target=None, min_steps=0, precision=float32; this run uses .* target=1.0, min_steps=1"):
        compress(CompressConfig(**adaptive, output=str(out)))
    manifest = compress(CompressConfig(**adaptive, output=str(tmp_path / "adaptive")))
    assert manifest["complete"] and (manifest["write_target"], manifest["write_min_steps"]) == (1.0, 1)
    (row,) = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "adaptive")).read("memories").to_pylist()
    assert 1 <= row["steps_used"] <= 4 and row["write_steps"] == 4 and row["write_target"] == 1.0
    assert compress(CompressConfig(**adaptive, output=str(tmp_path / "adaptive")))["this_run"]["memories"] == 0
    # a bf16 write is another setting too: its own store, its own memory ids, a memory close to the float32 one
    bf16 = compress(CompressConfig(reader=str(kv_reader_dir), input=str(corpus), output=str(tmp_path / "bf16"),
                                   precision="bfloat16"))
    assert bf16["complete"] and bf16["write_precision"] == "bfloat16"
    (fp32_row,) = MemoryStore(pafs.LocalFileSystem(), str(out)).read("memories").to_pylist()
    (bf16_row,) = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "bf16")).read("memories").to_pylist()
    assert (fp32_row["write_precision"], bf16_row["write_precision"]) == ("float32", "bfloat16")
    assert bf16_row["memory_id"] != fp32_row["memory_id"]
    fp32_memory, bf16_memory = torch.tensor(fp32_row["memory"]), torch.tensor(bf16_row["memory"])
    assert 0 < (fp32_memory - bf16_memory).abs().max() < 0.02 * fp32_memory.abs().max()


def test_the_writers_metrics_move_on_ray_prometheus_endpoint(ray_cluster, kv_reader_dir, tmp_path):
    """Memories written, error rows by reason, write seconds and steps used, scraped over HTTP after a small run."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    exs = KVTask(1).examples(3, seed=[31, 3])
    lines = [json.dumps({"id": f"m{i}", "text": e.context}) for i, e in enumerate(exs)]
    lines += [json.dumps({"id": "blank", "text": "   "}), json.dumps({"id": "number", "text": 7})]
    (corpus / "docs.jsonl").write_text("\n".join(lines))
    url = ray_cluster["metrics"]

    def counts() -> dict[str, float]:
        return {"written": scrape(url, metrics.WRITTEN.exported),
                "empty": scrape(url, metrics.ERROR_ROWS.exported, reason="empty"),
                "not_text": scrape(url, metrics.ERROR_ROWS.exported, reason="not_text"),
                "2 steps": scrape(url, metrics.STEPS_USED.exported + "_bucket", le="2.0"),
                "write seconds": scrape(url, metrics.WRITE_SECONDS.exported)}

    before = counts()
    manifest = compress(CompressConfig(reader=str(kv_reader_dir), input=str(corpus), output=str(tmp_path / "out"),
                                       steps=2, greedy_check=False))
    assert manifest["complete"] and manifest["memories"] == 3 and manifest["errors"] == 2
    wanted = {"written": 3, "empty": 1, "not_text": 1, "2 steps": 3, "write seconds": 1e-6}
    assert wait_for(lambda: not unmoved(before, counts(), wanted), timeout=90), (
        unmoved(before, counts(), wanted), exported_names(url))


def test_chunked_documents_become_ordered_memories(ray_cluster, kv_reader_dir, tmp_path):
    """Every chunk of every document is written, split by the job's chunk size and overlap, and the manifest
    accounts for them; the chunking is recorded in the manifest and every part, and a rerun with another chunking
    (unchunked included: the reader's maximum, no overlap) is refused before anything is written."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    exs = KVTask(1).examples(30, seed=[2, 2])
    texts = {f"d{i}": e.context * (1 + 10 * (i % 3)) for i, e in enumerate(exs)}  # 8, 88 and 168 tokens
    (corpus / "docs.jsonl").write_text("\n".join(json.dumps({"id": d, "text": t}) for d, t in texts.items()))
    out = tmp_path / "out"
    cfg = CompressConfig(reader=str(kv_reader_dir), input=str(corpus), output=str(out), chunk=True, chunk_tokens=60,
                         chunk_overlap=20, greedy_check=False)
    manifest = compress(cfg)
    # stride 40: 8 tokens -> 1 chunk, 88 -> [0:60] [40:88], 168 -> [0:60] [40:100] [80:140] [120:168]
    assert manifest["complete"] and manifest["errors"] == 0 and manifest["extra_chunks"] == 10 * 1 + 10 * 3
    assert (manifest["chunk_tokens"], manifest["chunk_overlap"], manifest["chunked"]) == (60, 20, True)
    store = MemoryStore(pafs.LocalFileSystem(), str(out))
    mem = store.read("memories", ["doc_id", "chunk", "n_chunks", "n_context_tokens", "memory_id"])
    rows = sorted(mem.to_pylist(), key=lambda r: (int(r["doc_id"][1:]), r["chunk"]))
    assert [(r["doc_id"], r["chunk"], r["n_chunks"], r["n_context_tokens"]) for r in rows if r["doc_id"] == "d2"] == \
        [("d2", 0, 4, 60), ("d2", 1, 4, 60), ("d2", 2, 4, 60), ("d2", 3, 4, 48)]
    assert manifest["memories"] == 30 + 40 and manifest["inputs"] == 30
    reader = Reader.from_pretrained(kv_reader_dir)
    chunking = Chunking(tokens=60, overlap=20)
    expected = [(d, c, records.memory_id(reader.fingerprint, reader.write_setting(), piece))
                for d, ids in zip(texts, tokenize(reader.tokenizer, list(texts.values())))
                for c, piece in enumerate(chunking.split(ids))]
    assert sorted((r["doc_id"], r["chunk"], r["memory_id"]) for r in rows) == sorted(expected)  # the very tokens
    assert {recorded(m, Chunking(tokens=1)) for m in store.metadata("memories").values()} == {chunking}

    for other in ({"chunk_tokens": 50}, {"chunk_overlap": 0}, {"chunk": False, "chunk_tokens": None,
                                                                "chunk_overlap": 0}):
        with pytest.raises(ValueError, match="holds memories chunked at 60 tokens per chunk, overlap 20"):
            compress(CompressConfig(**{**cfg.__dict__, **other}))
    assert store.manifest() == manifest  # nothing written by the refused runs


def _wait_for_no_writers(address: str, timeout: float = 60) -> None:
    from ray.util.state import list_actors

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")]) if "MemoryWriter" in a.class_name]
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError("writer actors still alive after their driver was killed")


def test_killed_job_restarts_and_ends_with_every_document_exactly_once(ray_cluster, s3, kv_reader_dir, tmp_path):
    fs = s3.filesystem()
    prefix, out = f"gradmem-test/corpus-{time.time_ns()}", f"gradmem-test/memories-{time.time_ns()}"
    docs, expected = _corpus(fs, prefix, n=200)  # several writer calls: the kill lands after the first
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"], "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "jobs/compress.py", "--reader", str(kv_reader_dir), "--input", f"s3://{prefix}",
           "--output", f"s3://{out}", "--s3-endpoint", s3.endpoint, "--batch-size", "4", "--steps", "12",
           "--no-greedy-check"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    store = MemoryStore(fs, out)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and not store.parts("memories"):
        time.sleep(0.2)
    assert first.poll() is None, f"the job ended before it could be killed:\n{first.stdout.read()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    _wait_for_no_writers(ray_cluster["address"])
    good = sorted([d for d, _ in docs] + ["nan"])  # this reader is not poisoned: "nan" writes fine here
    written = store.read("memories", ["doc_id"]).num_rows
    assert 0 < written < len(good) and store.manifest() is None  # killed half-way

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["inputs"] == expected["inputs"], summary
    manifest = store.manifest()
    assert manifest["this_run"]["memories"] == len(good) - written  # only the missing ones were written
    ids = store.read("memories", ["doc_id"]).column("doc_id").to_pylist()
    assert sorted(ids) == good  # no duplicates, no gaps
    err = store.read("errors", ["doc_id", "reason"])
    assert err.num_rows == expected["errors"] - 1 and manifest["duplicates"] == 0


def test_a_hostile_corpus_runs_no_code_and_stops_nothing_and_chunk_reruns_complete(ray_cluster, kv_reader_dir,
                                                                                     tmp_path):
    """Issue 14 through the real pipeline: a pickled-object Parquet file, a lone surrogate, a line nested 2,000
    deep, an over-long id, blank lines, a pretty-printed .json array, twins, an online write, a garbage part and
    a killed run's temporary file in the store; then the rerun with --chunk the too_long error asks for."""
    from gradmem.store import MemoryIndex
    from test_store import pickled_object_parquet

    corpus, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "pwned"
    corpus.mkdir()
    (corpus / "evil.parquet").write_bytes(pickled_object_parquet(marker))
    exs = KVTask(1).examples(6, seed=[7, 7])
    lines = [json.dumps({"id": f"d{i}", "text": e.context}) for i, e in enumerate(exs[:3])]
    lines += ['{"id": "sur", "text": "ab\\ud800cd"}', "[" * 2000 + "]" * 2000, "",
              json.dumps({"id": "x" * 1025, "text": exs[0].context}),
              json.dumps({"id": "twin-1", "text": exs[3].context}), json.dumps({"id": "twin-2", "text": exs[3].context}),
              json.dumps({"id": "long", "text": exs[4].context * 40}), "   "]
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n")
    # a .json array whose second element is nested too deeply for json.loads: the first is still read
    (corpus / "more.json").write_text("[" + json.dumps({"id": "arr-0", "text": exs[5].context}, indent=2) + ",\n"
                                      + "[" * 3000 + "]" * 3000 + "]")
    (tmp_path / "outside.txt").write_text(exs[2].context)
    (corpus / "leak.txt").symlink_to(tmp_path / "outside.txt")  # a link out of the input: never read
    os.mkfifo(corpus / "pipe.jsonl")  # reading it would block the job: never read
    (corpus / "line\nbreak.txt").write_text(exs[1].context)  # Ray cannot open this name: one error row, not a stop
    reader = Reader.from_pretrained(kv_reader_dir)
    store = MemoryStore(pafs.LocalFileSystem(), str(out))
    online = reader.write([exs[0].context])  # the service wrote "online" (d0's text) into the store earlier
    store.write_part("memories", records.to_table(online, ["online"], reader.encode_contexts([exs[0].context])))
    (out / "memories" / "part-garbage.parquet").write_bytes(b"not parquet")
    stale = out / "memories" / ".tmp-0123-part-dead.parquet"
    stale.write_bytes(b"PAR1 half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    cfg = CompressConfig(reader=str(kv_reader_dir), input=str(corpus), output=str(out), greedy_check=False)
    first = compress(cfg)
    assert not marker.exists() and not stale.exists()
    assert first["inputs"] == 15 and first["complete"], first
    assert first["error_reasons"] == {"malformed": 7, "not_text": 1, "too_long": 1}
    assert first["skipped_parts"]["memories"] == 1 and first["other_memories"] == 1
    errors = {r["source"]: r for r in store.read("errors").to_pylist()}
    assert errors["evil.parquet#0"]["reason"] == "malformed" and errors["docs.jsonl:4"]["reason"] == "not_text"
    assert "symbolic link" in errors["leak.txt"]["message"] and "regular file" in errors["pipe.jsonl"]["message"]
    assert "control character" in errors["line\nbreak.txt"]["message"]
    assert errors["more.json[1]"]["reason"] == "malformed" and "leak" not in set(store.read("memories").column("doc_id").to_pylist())

    second = compress(CompressConfig(**{**cfg.__dict__, "chunk": True}))  # what the too_long error advised
    assert second["complete"] and second["superseded_errors"] == 1 and "too_long" not in second["error_reasons"]
    assert second["errors"] == 8 and second["this_run"]["memories"] == 4  # the 4 chunks of "long"

    index = MemoryIndex(MemoryStore(pafs.LocalFileSystem(), str(out)))
    index.refresh()
    one, two = index.entry(doc_id="twin-1"), index.entry(doc_id="twin-2")
    assert (one["doc_id"], two["doc_id"]) == ("twin-1", "twin-2") and one["memory_id"] == two["memory_id"]
    assert index.entry(doc_id="online")["memory_id"] == index.entry(doc_id="d0")["memory_id"]
    assert index.entry(doc_id="arr-0") is not None and index.stats()["skipped_parts"] == 1
