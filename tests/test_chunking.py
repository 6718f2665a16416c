"""Chunking of long documents (issue 15, item 4), in-process: the split, the settings and their validation, the
flags, what a store records, and a document's chunks coming back in order however the store's parts hold them."""

from __future__ import annotations

import random

import pyarrow.fs as pafs
import pytest

from conftest import load_job, make_reader
from gradmem import records
from gradmem.chunking import Chunking, recorded
from gradmem.config import ConfigError, from_dict
from gradmem.store import IncompleteDocument, MemoryIndex, MemoryStore
from gradmem.tasks.kv import KVTask
from pipelines.compress import CompressConfig
from pipelines.serve import ServeConfig


# ---------------------------------------------------------------------------------------------- the split
@pytest.mark.parametrize("tokens,overlap", [(4, 0), (4, 1), (4, 3), (8, 2), (1, 0)])
def test_split_keeps_every_token_in_order_with_the_overlap(tokens, overlap):
    chunking = Chunking(tokens=tokens, overlap=overlap)
    for n in range(0, 30):
        ids = list(range(100, 100 + n))
        pieces = chunking.split(ids)
        if n == 0:
            assert pieces == []
            continue
        assert all(1 <= len(p) <= tokens for p in pieces) and all(len(p) == tokens for p in pieces[:-1])
        for before, after in zip(pieces, pieces[1:]):
            assert after[:overlap] == before[-overlap:] if overlap else True  # the overlap repeats the tail
            assert len(after) > overlap  # every chunk adds a token of its own
        rebuilt = pieces[0] + [t for p in pieces[1:] for t in p[overlap:]]
        assert rebuilt == ids, (n, pieces)  # nothing dropped, nothing doubled beyond the overlap
        assert pieces[-1][-1] == ids[-1]
        assert len(pieces) == 1 if n <= tokens else len(pieces) == -(-(n - overlap) // (tokens - overlap))


def test_chunkings_are_recorded_and_read_back():
    chunking = Chunking(tokens=8, overlap=2)
    assert recorded(chunking.metadata(), Chunking(tokens=100)) == chunking
    assert recorded(chunking.describe(), Chunking(tokens=100)) == chunking  # a manifest's ints
    assert recorded({"reader_fingerprint": "x"}, Chunking(tokens=100)) == Chunking(tokens=100, overlap=0)  # older
    assert hash(chunking) == hash(Chunking(tokens=8, overlap=2))


# ---------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("settings,message", [
    ({"chunk": True, "chunk_tokens": 10, "chunk_overlap": 10}, "must be smaller than the chunk size"),
    ({"chunk": True, "chunk_tokens": 10, "chunk_overlap": 12}, "must be smaller than the chunk size"),
    ({"chunk": True, "chunk_tokens": 0}, "chunk_tokens"),
    ({"chunk": True, "chunk_tokens": -5}, "chunk_tokens"),
    ({"chunk": True, "chunk_overlap": -1}, "chunk_overlap"),
    ({"chunk_tokens": 10}, "set chunk"),  # a chunk size without --chunk would be silently unused
    ({"chunk_overlap": 2}, "set chunk"),
])
def test_bad_chunk_settings_are_refused_with_a_clear_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(CompressConfig, {"reader": "r", "input": "i", "output": "o", **settings})


def test_chunk_settings_are_checked_against_the_reader():
    cfg = CompressConfig(reader="r", input="i", output="o", chunk=True, chunk_tokens=60, chunk_overlap=20)
    assert cfg.chunking(100) == Chunking(tokens=60, overlap=20)
    with pytest.raises(ValueError, match="over the reader's max_context_tokens"):
        cfg.chunking(50)
    assert CompressConfig(reader="r", input="i", output="o").chunking(100) == Chunking(tokens=100)  # unchunked
    big_overlap = CompressConfig(reader="r", input="i", output="o", chunk=True, chunk_overlap=100)
    with pytest.raises(ValueError, match="chunk_overlap 100 with chunks of the reader's max_context_tokens"):
        big_overlap.chunking(100)


def test_chunk_settings_are_flags_of_the_jobs(capsys):
    compress_job, serve_job = load_job("compress"), load_job("serve")
    base = ["--reader", "r", "--input", "i", "--output", "o"]
    cfg = compress_job.parse(base + ["--chunk", "--chunk-tokens", "64", "--chunk-overlap", "8"])
    assert (cfg.chunk, cfg.chunk_tokens, cfg.chunk_overlap) == (True, 64, 8)
    for bad in (["--chunk", "--chunk-tokens", "8", "--chunk-overlap", "8"], ["--chunk-tokens", "8"],
                ["--chunk", "--chunk-overlap", "-1"]):
        with pytest.raises(SystemExit) as stop:
            compress_job.parse(base + bad)
        assert stop.value.code == 2
        assert "chunk" in capsys.readouterr().err
    cfg, _ = serve_job.parse(["--reader", "r", "--memories", "m", "--max-chunks-per-query", "3"])
    assert cfg.max_chunks_per_query == 3 and ServeConfig(reader="r", memories="m").max_chunks_per_query == 16
    with pytest.raises(SystemExit):
        serve_job.parse(["--reader", "r", "--memories", "m", "--max-chunks-per-query", "0"])
    assert "max_chunks_per_query" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the store
def _chunk_tables(reader, doc_id: str, texts: list[str], chunking: Chunking | None, groups: list[list[int]]):
    """The chunk memories of one document as one table per group of chunk numbers (a layout of parts)."""
    memories = reader.write(texts)
    ids = reader.encode_contexts(texts)
    return [records.to_table(memories[group], [doc_id] * len(group), [ids[c] for c in group],
                             chunks=group, n_chunks=[len(texts)] * len(group), chunking=chunking)
            for group in groups], memories


def test_a_documents_chunks_come_back_in_order_however_the_parts_lay_them_out(tmp_path):
    reader = make_reader("llama")
    texts = [ex.context for ex in KVTask(1).examples(5, seed=[31, 4])]
    chunking = Chunking(tokens=8)
    rng = random.Random(0)
    layouts = [[[0, 1, 2, 3, 4]], [[4, 3, 2, 1, 0]], [[3, 1], [4], [0, 2]], [[2], [0], [4], [1], [3]]]
    layouts += [_shuffled_groups(rng) for _ in range(3)]
    for n, layout in enumerate(layouts):
        store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / f"store-{n}"))
        tables, memories = _chunk_tables(reader, "long", texts, chunking, layout)
        for table in tables:
            store.write_part("memories", table)
        other, _ = _chunk_tables(reader, "other", texts[:2], chunking, [[1, 0]])
        store.write_part("memories", other[0])
        index = MemoryIndex(store)
        index.refresh()
        entries = index.document("long")
        assert [e["chunk"] for e in entries] == [0, 1, 2, 3, 4], layout
        expected = [records.memory_id(reader.fingerprint, memories.setting, ids)
                    for ids in reader.encode_contexts(texts)]
        assert [e["memory_id"] for e in entries] == expected, layout
        assert [e["chunk"] for e in index.document("other")] == [0, 1] and index.document("nope") is None
        assert set(store.chunkings(Chunking(tokens=100)).values()) == {chunking}


def _shuffled_groups(rng: random.Random) -> list[list[int]]:
    order = list(range(5))
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(1, 5), 2))
    return [order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:]]


def test_a_missing_chunk_is_an_error_never_a_partial_document(tmp_path):
    reader = make_reader("llama")
    texts = [ex.context for ex in KVTask(1).examples(4, seed=[32, 4])]
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    tables, _ = _chunk_tables(reader, "gappy", texts, None, [[0, 1], [3]])  # chunk 2 never written
    for table in tables:
        store.write_part("memories", table)
    index = MemoryIndex(store)
    index.refresh()
    with pytest.raises(IncompleteDocument, match=r"'gappy' is incomplete: chunk 2 of 4 missing"):
        index.document("gappy")
    assert index.entry(doc_id="gappy", chunk=3) is not None  # one chunk by number is still there
    late, _ = _chunk_tables(reader, "gappy", texts, None, [[2]])
    store.write_part("memories", late[0])
    index.refresh()
    assert [e["chunk"] for e in index.document("gappy")] == [0, 1, 2, 3]  # complete once it arrives

    table = records.to_table(reader.write(texts[:1]), ["odd"], reader.encode_contexts(texts[:1]), chunks=[0],
                             n_chunks=[2])
    store.write_part("memories", table)
    other = records.to_table(reader.write(texts[1:2]), ["odd"], reader.encode_contexts(texts[1:2]), chunks=[1],
                             n_chunks=[3])
    store.write_part("memories", other)
    index.refresh()
    with pytest.raises(IncompleteDocument, match="disagree on how many there are"):
        index.document("odd")


def test_the_manifest_counts_a_document_complete_only_with_every_chunk(tmp_path):
    """What the batch job's manifest says of a chunked document (``summarize``): complete once all its chunks
    are stored, in whatever parts, and not before (a chunk lost is an input not accounted for)."""
    import pyarrow as pa

    from pipelines.compress import summarize

    reader = make_reader("llama")
    texts = [ex.context for ex in KVTask(1).examples(3, seed=[33, 4])]
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    inputs = pa.table({"order": [0], "source": ["docs.jsonl:1"], "doc_id": ["long"]})
    tables, _ = _chunk_tables(reader, "long", texts, Chunking(tokens=8), [[2], [0], [1]])
    store.write_part("memories", tables[0])
    store.write_part("memories", tables[1])
    counts = summarize(store, inputs)
    assert not counts["complete"] and counts["missing"] == 1 and counts["memories"] == 2
    store.write_part("memories", tables[2])
    counts = summarize(store, inputs)
    assert counts["complete"] and counts["missing"] == 0 and counts["memories"] == 3 and counts["extra_chunks"] == 2
