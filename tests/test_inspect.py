"""Cost accounting (issue 17, item 3): `python jobs/inspect_store.py STORE` on small real stores. Every figure of
the report is recomputed here from the Parquet files and the reader's config.json, without gradmem.costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import load_job, make_reader, markdown_rows
from gradmem import records
from gradmem.data import tokenize
from gradmem.store import MemoryStore
from gradmem.tasks.kv import KVTask

ROOT = Path(__file__).resolve().parents[1]
M = 10  # memory rows: longer than a 1-pair context (8 tokens), so some memories save nothing per query
S_PER_TOKEN = 1e-3


def _write(reader, store: MemoryStore, pairs: int, n: int, prefix: str, times: list[float], steps: int | None = None,
           revision: int = 0):
    texts = [e.context for e in KVTask(pairs).examples(n, seed=pairs)]
    ids = tokenize(reader.tokenizer, texts)
    table = records.to_table(reader.write(texts, steps=steps), [f"{prefix}-{i}" for i in range(n)], ids,
                             write_time_s=times, revisions=[revision] * n)
    store.write_part("memories", table)


@pytest.fixture
def built(arch, tmp_path):
    """A store with four parts of one reader (three write settings; the last part a repair of two memories of the
    first) and one part of another reader."""
    reader = make_reader(arch, num_memory=M)
    reader.save_pretrained(tmp_path / "reader")
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    _write(reader, store, 1, 3, "short", [0.05, 0.1, 0.2])  # 8 tokens < M: never pays
    _write(reader, store, 4, 3, "long", [0.3, 0.4, 0.9])
    _write(reader, store, 3, 2, "k3", [0.7, 1.1], steps=3)
    _write(make_reader(arch, seed=5, num_memory=M), store, 2, 2, "other", [0.5, 0.6])
    _write(reader, store, 1, 2, "short", [0.3, 0.35], steps=6, revision=1)  # short-0, short-1 repaired
    store.write_manifest({"reader": str(tmp_path / "reader"), "memories": 10})
    return tmp_path, reader


def _expected(store_dir: Path, reader_dir: Path, s_per_token: float) -> dict[tuple[str, int], dict]:
    """Per (doc_id, chunk), from the Parquet files and config.json alone."""
    config = json.loads((reader_dir / "config.json").read_text())
    if config["model_type"] == "gpt2":
        layers, kv_heads, head_dim = config["n_layer"], config["n_head"], config["n_embd"] // config["n_head"]
    else:
        layers, kv_heads, head_dim = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    assert config["dtype"] == "float32"
    per_token = 2 * layers * kv_heads * head_dim * 4
    mine = config["gradmem"]["fingerprint"]
    out = {}
    newest = {}  # (reader, doc_id, chunk) -> the highest revision: the current memory
    for path in sorted((store_dir / "memories").glob("part-*.parquet")):
        table = pq.read_table(path, columns=["doc_id", "chunk", "revision"])
        fingerprint = pq.read_schema(path).metadata[b"gradmem.reader_fingerprint"].decode()
        for row in table.to_pylist():
            key = (fingerprint, row["doc_id"], row["chunk"])
            newest[key] = max(newest.get(key, 0), row["revision"])
    for path in sorted((store_dir / "memories").glob("part-*.parquet")):
        table = pq.read_table(path)
        fingerprint = table.schema.metadata[b"gradmem.reader_fingerprint"].decode()
        memory = table.column("memory").combine_chunks().to_numpy_ndarray()
        share = os.path.getsize(path) / table.num_rows
        for i, row in enumerate(table.drop_columns(["memory"]).to_pylist()):
            n, m = row["n_context_tokens"], memory.shape[1]
            e = {"write_s": row["write_time_s"], "tensor_bytes": memory[i].nbytes, "part_bytes_share": share,
                 "n_context_tokens": n, "fingerprint": fingerprint, "steps": row["write_steps"], "lr": row["write_lr"],
                 "kv_bytes": None, "prefix_rows": None, "tokens_saved": None, "prefill_s_saved": None,
                 "break_even_queries": None}
            e["current"] = row["revision"] == newest[(fingerprint, row["doc_id"], row["chunk"])]
            if fingerprint == mine and e["current"]:  # a replaced memory is never read: it saves nothing
                saved = n - m
                e.update(kv_bytes=per_token * n, prefix_rows=m, tokens_saved=saved, prefill_s_saved=saved * s_per_token,
                         break_even_queries=row["write_time_s"] / (saved * s_per_token) if saved > 0 else None)
            out[(row["doc_id"], row["chunk"], row["revision"])] = e
    return out


def _summary(rows: list[dict]) -> dict:
    out = {"memories": len(rows), "superseded": sum(1 for r in rows if not r["current"])}
    for key in ("write_s", "tensor_bytes", "part_bytes_share", "kv_bytes", "n_context_tokens", "tokens_saved",
                "prefill_s_saved", "break_even_queries"):
        values = [r[key] for r in rows if r[key] is not None]
        if key != "break_even_queries":
            out[f"total_{key}"] = float(np.sum(values)) if values else None
        out[f"mean_{key}"] = float(np.mean(values)) if values else None
        out[f"median_{key}"] = float(np.median(values)) if values else None
    saved = out["total_prefill_s_saved"]
    out["break_even_queries"] = out["total_write_s"] / saved if saved else None
    out["memories_that_never_pay"] = sum(1 for r in rows if r["tokens_saved"] is not None and r["tokens_saved"] <= 0)
    return out


def _close(got, want, where):
    if want is None:
        assert got is None, where
    else:
        assert got == pytest.approx(want, rel=1e-9), where


def _run(argv, capsys) -> tuple[str, str]:
    load_job("inspect_store").main([str(a) for a in argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_every_figure_is_recomputed_from_the_store(built, capsys):
    tmp, reader = built
    out_json = tmp / "costs.json"
    text, _ = _run([tmp / "store", "--json", out_json, "--prefill-s-per-token", S_PER_TOKEN, "--per-memory", 3], capsys)
    data = json.loads(out_json.read_text())
    expected = _expected(tmp / "store", tmp / "reader", S_PER_TOKEN)

    assert data["prefill"]["source"] == "given" and data["prefill"]["s_per_token"] == S_PER_TOKEN
    assert "prefill cost: given" in text
    assert data["reader"]["fingerprint"] == reader.fingerprint
    assert data["part_bytes"] == sum(os.path.getsize(p) for p in (tmp / "store" / "memories").glob("part-*.parquet"))

    got = {(x["doc_id"], x["chunk"], x["revision"]): x for x in data["memories"]}
    assert set(got) == set(expected) and len(data["memories"]) == 12
    for key, want in expected.items():
        for figure in ("write_s", "tensor_bytes", "part_bytes_share", "kv_bytes", "n_context_tokens", "prefix_rows",
                       "tokens_saved", "prefill_s_saved", "break_even_queries"):
            _close(got[key][figure], want[figure], (key, figure))
        assert got[key]["current"] == want["current"], key
    assert all(got[(f"short-{i}", 0, 0)]["break_even_queries"] is None for i in range(3))  # 8 tokens < 10 rows
    assert [k for k, x in got.items() if not x["current"]] == [("short-0", 0, 0), ("short-1", 0, 0)]  # repaired
    assert all(got[(f"short-{i}", 0, 0)]["kv_bytes"] is None for i in range(2)) and got[("short-0", 0, 1)]["kv_bytes"]
    assert data["reader"]["unpriced_fingerprints"] == sorted({e["fingerprint"] for e in expected.values()}
                                                             - {reader.fingerprint})

    rows = list(expected.values())
    for summary, subset in [(data["store"], rows)] + [
            (g, [r for r in rows if (r["fingerprint"], r["steps"], r["lr"]) ==
                 (g["reader_fingerprint"], g["write_steps"], g["write_lr"])]) for g in data["groups"]]:
        assert subset, summary
        for figure, want in _summary(subset).items():
            _close(summary[figure], want, figure)
    assert sorted((g["reader_fingerprint"] == reader.fingerprint, g["write_steps"], g["memories"])
                  for g in data["groups"]) == [(False, 2, 2), (True, 2, 6), (True, 3, 2), (True, 6, 2)]
    assert data["store"]["memories_that_never_pay"] == 3 and data["store"]["superseded"] == 2  # short-2, and the repairs

    # the printed table says what the JSON says: the store column and the first --per-memory memories
    table = markdown_rows(text, "| figure |")
    assert table["memories"]["store"] == "12" and "2 replaced by a repair" in text
    assert float(table["write s (total)"]["store"]) == pytest.approx(data["store"]["total_write_s"], rel=1e-3)
    assert float(table["break-even queries (all memories)"]["store"]) == pytest.approx(
        data["store"]["break_even_queries"], rel=1e-3)
    assert len([c for c in table["memories"] if c != "figure"]) == 5  # the store and its four groups
    printed = markdown_rows(text, "| doc_id |")
    assert list(printed) == [x["doc_id"] for x in data["memories"][:3]]
    for doc_id, row in printed.items():
        x = next(x for x in data["memories"] if x["doc_id"] == doc_id)
        assert int(row["tokens"]) == x["n_context_tokens"] and row["KV bytes"] == (
            "-" if x["kv_bytes"] is None else str(x["kv_bytes"]))


def test_prefill_measured_with_the_reader(built, capsys):
    tmp, reader = built
    out_json = tmp / "costs.json"
    text, _ = _run([tmp / "store", "--reader", tmp / "reader", "--json", out_json, "--repeats", 2,
                    "--per-memory", 0], capsys)
    data = json.loads(out_json.read_text())
    prefill = data["prefill"]
    lengths = [x["n_context_tokens"] for x in data["memories"] if x["reader_fingerprint"] == reader.fingerprint]
    assert prefill["source"] == "measured" and "prefill cost: measured" in text
    assert prefill["measured_tokens"] == int(np.median(lengths)) and len(prefill["samples_s"]) == 2
    assert prefill["s_per_token"] == pytest.approx(np.median(prefill["samples_s"]) / prefill["measured_tokens"])
    for x in data["memories"]:
        if x["tokens_saved"] is not None and x["tokens_saved"] > 0:
            assert x["break_even_queries"] == pytest.approx(
                x["write_s"] / ((x["n_context_tokens"] - M) * prefill["s_per_token"]))
    assert "| doc_id |" not in text  # --per-memory 0


def test_an_empty_store_reports_zeros(tmp_path, capsys):
    reader = make_reader("llama")
    reader.save_pretrained(tmp_path / "reader")
    store = MemoryStore(pafs.LocalFileSystem(), str(tmp_path / "store"))
    store.write_part("errors", records.error_table([{"source": "in.jsonl:1", "reason": "empty", "message": "empty",
                                                     "doc_id": "a", "chunk": 0, "n_chunks": 1}], reader.fingerprint))
    store.write_manifest({"reader": str(tmp_path / "reader"), "memories": 0})
    text, _ = _run([tmp_path / "store", "--json", tmp_path / "costs.json"], capsys)
    data = json.loads((tmp_path / "costs.json").read_text())
    assert data["memories"] == [] and data["parts"] == 0 and data["part_bytes"] == 0
    s = data["store"]
    assert s["memories"] == 0 and s["total_write_s"] == 0 and s["total_kv_bytes"] == 0 and s["mean_write_s"] == 0
    assert s["median_tokens_saved"] == 0 and s["break_even_queries"] is None
    assert data["prefill"]["source"] == "unavailable" and data["groups"] == []
    assert markdown_rows(text, "| figure |")["memories"]["store"] == "0"


@pytest.mark.parametrize("make", ["missing", "not_a_store", "a_file", "bad_scheme"])
def test_a_bad_store_path_exits_2_with_a_clear_error(tmp_path, capsys, make):
    target = {"missing": tmp_path / "nowhere", "not_a_store": tmp_path, "a_file": tmp_path / "f.txt",
              "bad_scheme": "gs://bucket/x"}[make]
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        _run([target], capsys)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(target) in err
    assert {"missing": "no such directory", "not_a_store": "not a memory store", "a_file": "no such directory",
            "bad_scheme": "only local paths and s3://"}[make] in err


def test_an_unreadable_reader_exits_2_and_a_missing_manifest_reader_is_only_noted(built, capsys):
    tmp, _ = built
    with pytest.raises(SystemExit) as exc:
        _run([tmp / "store", "--reader", tmp / "store"], capsys)
    assert exc.value.code == 2 and "--reader" in capsys.readouterr().err
    (tmp / "store" / "manifest.json").write_text(json.dumps({"reader": str(tmp / "gone")}))
    text, _ = _run([tmp / "store", "--json", tmp / "c.json"], capsys)
    data = json.loads((tmp / "c.json").read_text())
    assert data["reader"]["geometry"] is None and all(x["kv_bytes"] is None for x in data["memories"])
    assert data["store"]["memories"] == 12 and data["store"]["total_kv_bytes"] is None
    assert "not reachable" in text and data["prefill"]["source"] == "unavailable"


def test_the_command_as_users_run_it_exits_2_on_a_bad_store(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/inspect_store.py", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no such directory" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("config, per_token", [
    # Llama-3.2-1B: 16 layers, 8 KV heads of 64 (grouped-query attention), bf16
    ({"model_type": "llama", "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
      "hidden_size": 2048, "head_dim": 64, "torch_dtype": "bfloat16"}, 2 * 16 * 8 * 64 * 2),
    # GPT-2 small: 12 layers, 12 heads, 768 wide, no dtype named (float32)
    ({"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768}, 2 * 12 * 12 * 64 * 4),
    # a multimodal wrapper: the text model's numbers; no num_key_value_heads means as many as heads
    ({"model_type": "x", "text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
                                         "dtype": "float16"}}, 2 * 2 * 4 * 16 * 2),
])
def test_kv_bytes_per_token_from_llama_and_gpt2_configs(config, per_token):
    from gradmem.costs import kv_geometry

    geometry = kv_geometry(config)
    assert geometry.bytes_per_token == per_token and geometry.kv_bytes(1000) == 1000 * per_token
    assert kv_geometry(config, kv_dtype="float32").bytes_per_element == 4
    with pytest.raises(ValueError, match="unknown KV dtype"):
        kv_geometry(config, kv_dtype="int3")
