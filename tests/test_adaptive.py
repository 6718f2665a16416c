"""Adaptive writes: each context until its reconstruction accuracy reaches a target, or K_max steps.

An easy context (a repeated pair) and a hard one (five random pairs) share one batch; the target is chosen from
their own fixed-K accuracy trajectories, so the easy one meets it after j < K_max steps and the hard one never."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradmem import WriteSetting, methods, records
from gradmem.config import ConfigError, MemoryConfig
from gradmem.data import pad, tokenize
from gradmem.write import write_memory
from conftest import make_reader

EASY = "!aa:aa!!aa:aa!!aa:aa!!aa:aa!|"
HARD = "!Xq:7z!!b3:Kd!!p0:Qm!!Zz:1y!!f8:Ah!|"
K_MAX = 4
LR = 0.5


@pytest.fixture
def frozen(arch):
    return make_reader(arch).freeze()


def _batch(reader, texts=(EASY, HARD)):
    ids = tokenize(reader.tokenizer, list(texts))
    return pad(ids, reader.tokenizer.pad_token_id or 0)  # (B, L), (B, L)


def _trajectory(reader, ctx_ids, ctx_mask) -> torch.Tensor:
    """(K_MAX + 1, B): the accuracy of M_k, from fixed-k writes."""
    return torch.stack([write_memory(reader, ctx_ids, ctx_mask, k, LR, mode="inference").accuracy
                        for k in range(K_MAX + 1)])


def _easy_target(trajectory: torch.Tensor) -> tuple[float, int]:
    """A target the easy row (0) first meets after j in 1..K_MAX-1 steps and the hard row (1) never meets."""
    easy, hard = trajectory[:, 0], trajectory[:, 1]
    j = next(k for k in range(1, K_MAX) if easy[k] > easy[:k].max())
    target = float(easy[j])
    assert float(hard.max()) < target, "the hard context reaches the easy one's accuracy: not a test"
    return target, j


def test_adaptive_write_stops_early_on_an_easy_context_and_uses_k_max_on_a_hard_one(frozen):
    ctx_ids, ctx_mask = _batch(frozen)
    target, j = _easy_target(_trajectory(frozen, ctx_ids, ctx_mask))
    out = write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="inference", target=target)
    assert out.steps_used.tolist() == [j, K_MAX]
    early = write_memory(frozen, ctx_ids, ctx_mask, j, LR, mode="inference")
    full = write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="inference")
    assert (out.memory[0] - early.memory[0]).abs().max() < 1e-5  # the easy memory is M_j
    assert (out.memory[1] - full.memory[1]).abs().max() < 1e-5  # the hard one M_K, though its batch mate left
    assert out.accuracy[0] == pytest.approx(float(early.accuracy[0]), abs=1e-6) and out.accuracy[0] >= target
    assert out.accuracy[1] == pytest.approx(float(full.accuracy[1]), abs=1e-6)
    # losses: the trajectory up to M_j, then the final loss repeated (the memory no longer changes)
    assert torch.allclose(out.losses[0, : j + 1], early.losses[0], atol=1e-5)
    assert torch.allclose(out.losses[0, j + 1 :], early.losses[0, -1].expand(K_MAX - j), atol=1e-5)
    assert torch.allclose(out.losses[1], full.losses[1], atol=1e-5)


def test_adaptive_write_equals_the_fixed_k_write_when_the_target_is_unreachable(frozen):
    ctx_ids, ctx_mask = _batch(frozen)
    fixed = write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="inference")
    adaptive = write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="inference", target=1.0)
    assert float(fixed.accuracy.max()) < 1.0  # the target is out of reach for both
    assert adaptive.steps_used.tolist() == [K_MAX, K_MAX]
    assert (adaptive.memory - fixed.memory).abs().max() < 1e-6
    assert torch.allclose(adaptive.losses, fixed.losses, atol=1e-6)
    assert torch.allclose(adaptive.accuracy, fixed.accuracy)
    # and the training path's first-order write, run without a graph, gives the same memories
    with torch.no_grad():
        first = write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="first_order")
    assert (adaptive.memory - first.memory).abs().max() < 1e-5


def test_min_steps_are_taken_before_the_target_is_checked(frozen):
    ctx_ids, ctx_mask = _batch(frozen)
    trajectory = _trajectory(frozen, ctx_ids, ctx_mask)
    target, j = _easy_target(trajectory)
    floor = j + 1  # past the step where the easy context met the target
    assert trajectory[floor, 0] >= target  # and it still meets it there (its accuracy does not fall back)
    out = write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="inference", target=target, min_steps=floor)
    assert out.steps_used.tolist() == [floor, K_MAX]
    at_floor = write_memory(frozen, ctx_ids, ctx_mask, floor, LR, mode="inference")
    assert (out.memory[0] - at_floor.memory[0]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="without a target"):
        write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="inference", min_steps=1)
    with pytest.raises(ValueError, match="min_steps must be in"):
        write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="inference", target=0.5, min_steps=K_MAX + 1)
    mem = frozen.write([EASY, HARD], steps=K_MAX, lr=LR, target=target, min_steps=floor)
    assert mem.steps_used.tolist() == [floor, K_MAX] and mem.setting.min_steps == floor
    back = _parquet_round_trip(records.to_table(mem, ["easy", "hard"], tokenize(frozen.tokenizer, [EASY, HARD])))
    assert back.column("write_min_steps").to_pylist() == [floor, floor]
    assert records.from_table(back)[1].setting.min_steps == floor


def test_a_target_met_by_every_context_at_once_runs_no_step(frozen):
    ctx_ids, ctx_mask = _batch(frozen)
    out = write_memory(frozen, ctx_ids, ctx_mask, K_MAX, LR, mode="inference", target=1e-6)
    assert out.steps_used.tolist() == [0, 0]
    assert torch.equal(out.memory, frozen.memory.detach().expand(2, -1, -1))


def test_reader_write_keeps_steps_used_per_memory_in_input_order(frozen):
    ctx_ids, ctx_mask = _batch(frozen)
    target, j = _easy_target(_trajectory(frozen, ctx_ids, ctx_mask))
    # length bucketing reorders (the easy context is shorter); batch_size=1 writes each alone
    for batch_size in (1, 3):
        mem = frozen.write([HARD, EASY, HARD], steps=K_MAX, lr=LR, target=target, batch_size=batch_size)
        assert mem.steps_used.tolist() == [K_MAX, j, K_MAX] and mem.setting.target == target and mem.setting.steps == K_MAX
    fixed = frozen.write([HARD, EASY], steps=K_MAX, lr=LR)
    assert fixed.setting.target is None and fixed.steps_used.tolist() == [K_MAX, K_MAX]


def test_adaptive_write_settings_are_checked(frozen):
    ctx_ids, ctx_mask = _batch(frozen)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="target accuracy"):
            write_memory(frozen, ctx_ids, ctx_mask, 2, LR, mode="inference", target=bad)
        with pytest.raises(ConfigError, match="target_accuracy"):
            MemoryConfig.from_dict({"target_accuracy": bad})
    with pytest.raises(ValueError, match="inference write"):
        write_memory(frozen, ctx_ids, ctx_mask, 2, LR, mode="second_order", target=0.5)
    rmt = make_reader("llama", method="rmt").freeze()
    with pytest.raises(ValueError, match="no adaptive write"):
        methods.write(rmt, ctx_ids, ctx_mask, 2, LR, mode="inference", target=0.5)


def _parquet_round_trip(table: pa.Table) -> pa.Table:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    return pq.read_table(buf)


def test_records_keep_steps_used_and_the_target(frozen):
    ctx_ids, ctx_mask = _batch(frozen)
    target, j = _easy_target(_trajectory(frozen, ctx_ids, ctx_mask))
    ids = tokenize(frozen.tokenizer, [EASY, HARD])
    mem = frozen.write_tokens(ids, WriteSetting(K_MAX, LR, target))
    back = _parquet_round_trip(records.to_table(mem, ["easy", "hard"], ids))
    assert back.column("steps_used").to_pylist() == [j, K_MAX]
    assert back.column("write_steps").to_pylist() == [K_MAX, K_MAX]  # the setting: K_max
    assert back.column("write_target").to_pylist() == pytest.approx([target, target])
    assert [len(x) for x in back.column("write_losses").to_pylist()] == [j + 1, K_MAX + 1]  # the steps taken
    _, loaded = records.from_table(back, frozen.fingerprint)
    assert loaded.steps_used.tolist() == [j, K_MAX] and loaded.setting.target == pytest.approx(target)
    assert torch.equal(loaded.tensor, mem.tensor)
    assert torch.allclose(loaded.stats.losses, mem.stats.losses)  # padded back with the final loss
    # the target is part of the content address; a fixed-K memory keeps the id it always had
    assert records.memory_id(frozen.fingerprint, WriteSetting(K_MAX, LR, target), ids[0]) != records.memory_id(
        frozen.fingerprint, WriteSetting(K_MAX, LR), ids[0])
    assert back.column("memory_id").to_pylist()[0] == records.memory_id(frozen.fingerprint, mem.setting, ids[0])


def test_a_table_without_the_adaptive_columns_still_loads(frozen):
    ids = tokenize(frozen.tokenizer, [EASY, HARD])
    mem = frozen.write_tokens(ids, WriteSetting(2, LR))
    old = records.to_table(mem, ["a", "b"], ids).drop_columns(["steps_used", "write_target", "write_min_steps"])
    _, loaded = records.from_table(_parquet_round_trip(old), frozen.fingerprint)
    assert loaded.steps_used.tolist() == [2, 2] and loaded.setting == WriteSetting(2, LR)
    assert torch.equal(loaded.tensor, mem.tensor)


def test_one_table_of_mixed_write_settings_is_refused(frozen):
    ids = tokenize(frozen.tokenizer, [EASY, HARD])
    adaptive = records.to_table(frozen.write_tokens(ids, WriteSetting(K_MAX, LR, 0.9)), ["a", "b"], ids)
    fixed = records.to_table(frozen.write_tokens(ids, WriteSetting(K_MAX, LR)), ["c", "d"], ids)
    records.from_table(adaptive)  # varying steps_used under one setting is one setting
    with pytest.raises(ValueError, match="one write setting"):
        records.from_table(pa.concat_tables([adaptive, fixed]))


def test_a_store_holds_one_write_setting_and_an_adaptive_one_varies_only_in_steps_used(frozen, tmp_path):
    import pyarrow.fs as pafs

    from gradmem.store import MemoryStore
    from pipelines.compress import _check_output

    ids = tokenize(frozen.tokenizer, [EASY, HARD])
    spec, lr = frozen.spec, LR
    old = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "old"))
    fixed = records.to_table(frozen.write_tokens(ids, WriteSetting(K_MAX, lr)), ["a", "b"], ids)
    old.write_part("memories", fixed.drop_columns(["steps_used", "write_target", "write_min_steps"]))  # written before the columns
    _check_output(old, spec, WriteSetting(K_MAX, lr))
    with pytest.raises(ValueError, match="target=None, min_steps=0, precision=float32; this run uses .* target=0.9"):
        _check_output(old, spec, WriteSetting(K_MAX, lr, 0.9))
    old.write_part("memories", records.to_table(frozen.write_tokens(ids, WriteSetting(K_MAX, lr)), ["c", "d"], ids))
    _check_output(old, spec, WriteSetting(K_MAX, lr))  # old and new fixed-K parts: one setting
    assert old.read("memories", ["doc_id", "steps_used"]).num_rows == 4  # old parts read, with null steps_used

    adaptive = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "adaptive"))
    target, j = _easy_target(_trajectory(frozen, *_batch(frozen)))
    mem = frozen.write_tokens(ids, WriteSetting(K_MAX, lr, target))
    assert mem.steps_used.tolist() == [j, K_MAX]  # the steps used differ ...
    adaptive.write_part("memories", records.to_table(mem, ["a", "b"], ids))
    _check_output(adaptive, spec, WriteSetting(K_MAX, lr, target))  # ... under one setting
    for other in ((K_MAX, lr, None, 0), (K_MAX, lr, 0.99, 0), (K_MAX + 1, lr, target, 0), (K_MAX, lr, target, 1)):
        with pytest.raises(ValueError, match="Use another --output"):
            _check_output(adaptive, spec, WriteSetting(*other))


def test_the_compression_writer_stores_adaptive_memories_with_their_setting(frozen, tmp_path):
    """``pipelines.compress.MemoryWriter`` (the Ray Data actor's class, called here in-process)."""
    from pipelines.compress import MemoryWriter

    frozen.save_pretrained(tmp_path / "reader")
    ids = tokenize(frozen.tokenizer, [EASY, HARD])
    target, j = _easy_target(_trajectory(frozen, *_batch(frozen)))
    writer = MemoryWriter(str(tmp_path / "reader"), None, str(tmp_path / "store"), frozen.fingerprint,
                          WriteSetting(K_MAX, LR, target), batch_size=8, greedy_check=False, compile=False, threads=1)
    mids = [records.memory_id(frozen.fingerprint, WriteSetting(K_MAX, LR, target), t) for t in ids]
    rows = [{"doc_id": d, "chunk": 0, "n_chunks": 1, "token_ids": t, "memory_id": mid, "reason": None}
            for d, t, mid in zip(["easy", "hard"], ids, mids)]
    summary = writer(pa.Table.from_pylist(rows)).to_pylist()[0]
    assert summary["memories"] == 2 and summary["errors"] == 0
    (part,) = (tmp_path / "store" / "memories").glob("part-*.parquet")
    table = pq.read_table(part)
    assert table.column("steps_used").to_pylist() == [j, K_MAX]
    assert table.column("write_target").to_pylist() == pytest.approx([target, target])
    assert table.column("memory_id").to_pylist() == mids
