"""The memory record: Parquet round trip without Ray or pickle, content-addressed ids, refusals."""

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradmem import WriteSetting, records
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
    assert records.memory_id(reader.fingerprint, WriteSetting(2, 0.5), ids[0]) != records.memory_id(reader.fingerprint, WriteSetting(3, 0.5), ids[0])
    assert records.memory_id(reader.fingerprint, WriteSetting(2, 0.5), ids[0]) != records.memory_id("gm1-other", WriteSetting(2, 0.5), ids[0])


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


def test_a_bf16_write_is_its_own_setting_and_float32_ids_stay_as_they_were(reader):
    """The precision is part of the write setting: recorded per row, in the id of every non-float32 memory, and
    refused when mixed in one table; float32 ids are the ones computed before precisions existed."""
    exs, mem, ids = _written(reader)
    digest = hashlib.sha256(json.dumps([reader.fingerprint, 2, 0.5]).encode())  # the formula before precisions
    digest.update(np.asarray(ids[0], dtype=np.int64).tobytes())
    assert records.memory_id(reader.fingerprint, WriteSetting(2, 0.5), ids[0]) == digest.hexdigest()[:32]
    bf16 = reader.write([e.context for e in exs], precision="bfloat16")
    assert bf16.setting.precision == "bfloat16" and bf16.tensor.dtype == torch.float32
    gap = (bf16.tensor - mem.tensor).abs().max()
    assert 0 < gap < 0.05 * mem.tensor.abs().max(), gap  # bf16 arithmetic: close, not equal
    table = records.to_table(bf16, list("abcd"), ids)
    assert table.column("write_precision").to_pylist() == ["bfloat16"] * 4
    bf16_id = records.memory_id(reader.fingerprint, WriteSetting(2, 0.5, precision="bfloat16"), ids[0])
    assert table.column("memory_id")[0].as_py() == bf16_id != records.memory_id(reader.fingerprint, WriteSetting(2, 0.5), ids[0])
    assert records.from_table(table)[1].setting.precision == "bfloat16"
    before = records.to_table(mem, list("abcd"), ids).drop_columns(["write_precision"])  # a part from before
    assert records.from_table(before)[1].setting.precision == "float32"
    with pytest.raises(ValueError, match="mixes"):
        records.from_table(pa.concat_tables([records.to_table(mem, list("abcd"), ids), table]))
    with pytest.raises(ValueError, match="write precision must be one of"):
        reader.write(["!ab:cd!|"], precision="float16")


def test_a_write_setting_takes_the_reader_s_own_values_where_none_is_given_and_is_checked():
    """``WriteSetting.resolve`` (through ``Reader.write_setting``, as the batch job and the service resolve it):
    None takes the reader's own, a reader's floor of steps only with a target; bad settings are refused; the
    columns a part and a manifest record read back as the same setting, so the same memory id."""
    reader = make_reader("llama", target_accuracy=0.9, min_write_steps=1)
    cfg = reader.config
    assert reader.write_setting() == WriteSetting(cfg.write_steps, cfg.write_lr, 0.9, 1)
    assert reader.write_setting(steps=4, lr=0.1, target=0.5) == WriteSetting(4, 0.1, 0.5, 1)
    assert make_reader("llama").write_setting(min_steps=None) == WriteSetting(cfg.write_steps, cfg.write_lr)
    for bad, message in (({"precision": "float16"}, "precision"), ({"steps": -1}, "steps must be >= 0"),
                         ({"target": 1.5}, "target accuracy"), ({"steps": 1, "min_steps": 2}, "min_steps")):
        with pytest.raises(ValueError, match=message):
            reader.write_setting(**bad)
    setting = reader.write_setting(precision="bfloat16")
    back = records.write_setting(records.setting_columns(setting))
    assert back == setting
    ids = reader.encode_contexts(["!ab:cd!|"])[0]
    assert records.memory_id(reader.fingerprint, back, ids) == records.memory_id(reader.fingerprint, setting, ids)
    assert records.write_setting({"write_steps": 2, "write_lr": 0.5}) == WriteSetting(2, 0.5)  # a part of before
