"""The memory record: Parquet round trip without Ray or pickle, content-addressed ids, refusals."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradmem import records
from gradmem.data import tokenize
from gradmem.tasks.kv import KVTask
from conftest import make_reader


def _written(reader, n=4):
    exs = KVTask(2).examples(n, seed=11)
    texts = [e.context for e in exs]
    return exs, reader.write(texts), tokenize(reader.tokenizer, texts)


def test_round_trip_through_parquet_and_answers_agree(reader):
    exs, mem, ids = _written(reader)
    table = records.to_table(mem, [f"doc-{i}" for i in range(4)], ids, write_time_s=0.5)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    back = pq.read_table(buf)
    assert back.schema.field("memory").type == pa.fixed_shape_tensor(pa.float32(), [reader.num_memory, reader.d_model])
    meta = records.table_metadata(back)
    assert meta["reader_fingerprint"] == reader.fingerprint and meta["m"] == str(reader.num_memory)
    doc_ids, loaded = records.from_table(back, reader.fingerprint)
    assert doc_ids == [f"doc-{i}" for i in range(4)]
    assert torch.equal(loaded.tensor, mem.tensor) and torch.allclose(loaded.stats.losses, mem.stats.losses)
    questions = [e.query for e in exs]
    assert reader.answer(loaded, questions, max_new_tokens=4) == reader.answer(mem, questions, max_new_tokens=4)
    frame = back.to_pandas()  # plain pandas, no Ray
    assert list(frame["doc_id"]) == doc_ids and len(frame["memory"][0]) == reader.num_memory * reader.d_model


def test_memory_ids_are_content_addresses(reader):
    _, mem, ids = _written(reader)
    first = records.to_table(mem, ["a", "b", "c", "d"], ids).column("memory_id").to_pylist()
    again = records.to_table(reader.write([reader.tokenizer.decode(t) for t in ids]), list("wxyz"), ids)
    assert again.column("memory_id").to_pylist() == first  # doc ids do not matter, content does
    assert len(set(first)) == 4
    assert records.memory_id(reader.fingerprint, 2, 0.5, ids[0]) != records.memory_id(reader.fingerprint, 3, 0.5, ids[0])
    assert records.memory_id(reader.fingerprint, 2, 0.5, ids[0]) != records.memory_id("gm1-other", 2, 0.5, ids[0])


def test_records_of_another_reader_or_format_are_refused(reader, arch):
    _, mem, ids = _written(reader)
    table = records.to_table(mem, list("abcd"), ids)
    with pytest.raises(ValueError, match="written by reader"):
        records.from_table(table, make_reader(arch, seed=5).fingerprint)
    old = table.replace_schema_metadata({**table.schema.metadata, b"gradmem.format_version": b"0"})
    with pytest.raises(ValueError, match="format"):
        records.from_table(old)
    with pytest.raises(ValueError, match="no gradmem"):
        records.from_table(pa.table({"doc_id": ["a"]}))
    with pytest.raises(ValueError, match="one doc_id"):
        records.to_table(mem, ["a"], ids)
