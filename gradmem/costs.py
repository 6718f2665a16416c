"""Cost accounting of a memory store: what each memory cost to write, what it takes to keep, what it saves per query.

Per memory (one row of ``memories/*.parquet``):

    write_s              the record's ``write_time_s``: seconds of WRITE for this context on the machine that wrote
                         it (a batch's time shared by its contexts, see ``gradmem.records``)
    tensor_bytes         m x d x bytes of the stored element type (float32: 4): the memory tensor itself
    part_bytes_share     the size on disk of the Parquet part holding the row, divided evenly over the part's rows
                         (Parquet keeps no per-row sizes; ids, statistics and compression are shared this way)
    kv_bytes             the KV cache of the same context for this reader: 2 (K and V) x layers x kv_heads x
                         head_dim x n_context_tokens x bytes per element of the reader's dtype
    prefix_rows          positions the READ places before the question instead of the context: m for GradMem
                         and RMT, n_context_tokens for the full-context bound, 0 for the no-context bound
    tokens_saved         prefill positions saved per query against reading the full context: n_context_tokens -
                         prefix_rows (the question and the answer are the same either way and are not counted;
                         negative when the context is shorter than the memory)
    prefill_s_saved      tokens_saved x prefill seconds per token (``PrefillCost``)
    break_even_queries   write_s / prefill_s_saved: queries after which the WRITE has paid for itself; None
                         when nothing is saved per query (it never pays) or the prefill cost is unknown

A memory a repair replaced (a lower revision of the same reader, doc_id and chunk: ``gradmem.store``) keeps its
write seconds and bytes (paid, still stored) and has no savings figures (it is never read again).

Per group (reader fingerprint, write steps, write lr) and for the whole store: the count, totals, means and
medians of those figures, and the group's break-even: total write seconds / total prefill seconds saved when
every memory is queried once (the queries per memory after which the group paid for itself).

The prefill cost per token is measured (``measure_prefill``: a timed forward of the reader's language model over
a context of the store's median length, the median of a few runs, divided by that length) or given by the caller;
``PrefillCost.source`` says which. Dividing by the length assumes prefill time is linear in the tokens; at long
contexts attention makes it grow faster, so the per-token figure is only exact at the length it was measured at.
Write seconds come from the machine that wrote the store; the prefill is measured where this runs.

Everything but ``measure_prefill`` is plain arithmetic on rows and a config mapping (no torch, no Ray).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pydantic import Field

from gradmem.config import declared

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "double": 8,
               "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}
# Which rows of a memory a READ places before the question, by the reader's method (gradmem.methods).
PREFIX_ROWS = {"gradmem": "m", "rmt": "m", "full_context": "n_context_tokens", "no_context": "zero"}


@declared
class CostConfig:
    """What ``python jobs/inspect_store.py STORE`` reads and how it prices a query."""

    store: str = Field(description="the memory store: a local directory or s3://bucket/prefix")
    reader: str | None = Field(None, description="the reader directory (local or s3://); None: the one the store's "
                                                 "manifest names, when reachable")
    json_out: str | None = Field(None, description="write the same figures as JSON to this path")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (else AWS_ENDPOINT_URL[_S3])")
    per_memory: int = Field(10, ge=0, description="memories printed one per row (the JSON holds every memory)")
    prefill_s_per_token: float | None = Field(None, gt=0, description="prefill seconds per context token: given "
                                                                      "instead of measured with the reader")
    measure: bool = Field(True, description="time a prefill with the reader on this machine (when no "
                                            "--prefill-s-per-token is given)")
    measure_tokens: int | None = Field(None, ge=1, description="context length to time (None: the store's median "
                                                                "n_context_tokens, capped by the reader's positions)")
    repeats: int = Field(5, ge=1, description="timed forwards; the median is taken (after one untimed warm-up)")
    device: str = Field("cpu", description="device of the timed forward (cpu, cuda)")
    kv_dtype: str | None = Field(None, description=f"element type of the KV cache (one of {sorted(DTYPE_BYTES)}); "
                                                   "None: the reader's dtype in its config.json (float32 if absent)")


# ---------------------------------------------------------------------------------------------- the reader's KV cache
@dataclass(frozen=True)
class KVGeometry:
    """What a KV cache of one token costs for a model: 2 x layers x kv_heads x head_dim x bytes."""

    model_type: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    bytes_per_element: int
    dtype_source: str  # "config" (its dtype / torch_dtype), "flag" or "default"

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element

    def kv_bytes(self, n_tokens: int) -> int:
        return self.bytes_per_token * int(n_tokens)


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def kv_geometry(config: Mapping[str, Any], kv_dtype: str | None = None) -> KVGeometry:
    """From a Hugging Face ``config.json`` mapping: Llama-style (num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim or hidden_size / heads) and GPT-2-style (n_layer, n_head, n_embd) keys; a nested
    ``text_config`` (multimodal models) is used when present. A missing num_key_value_heads means no grouped-query
    attention (as many KV heads as heads)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None:
        raise ValueError("the model config names no layer or head count (num_hidden_layers / n_layer, "
                         "num_attention_heads / n_head)")
    kv_heads = _first(text, "num_key_value_heads", "n_kv_heads") or heads
    head_dim = _first(text, "head_dim")
    if head_dim is None:
        if hidden is None:
            raise ValueError("the model config names neither head_dim nor hidden_size / n_embd")
        head_dim = int(hidden) // int(heads)
    if kv_dtype is not None:
        dtype, source = kv_dtype, "flag"
    else:
        named = _first(text, "dtype", "torch_dtype") or _first(config, "dtype", "torch_dtype")
        dtype, source = (str(named).removeprefix("torch."), "config") if named else ("float32", "default")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    return KVGeometry(str(text.get("model_type") or config.get("model_type") or "?"), int(layers), int(kv_heads),
                      int(head_dim), dtype, DTYPE_BYTES[dtype], source)


# ---------------------------------------------------------------------------------------------- prefill cost
@dataclass(frozen=True)
class PrefillCost:
    """Prefill seconds per context token, and where the figure comes from."""

    s_per_token: float | None
    source: str  # "measured", "given" or "unavailable"
    detail: str  # how: the length timed, runs, device; or why unavailable
    measured_tokens: int | None = None
    samples_s: tuple[float, ...] = ()


def measure_prefill(lm, n_tokens: int, repeats: int = 5, device: str = "cpu", vocab_size: int | None = None,
                    seed: int = 0) -> PrefillCost:
    """Seconds per token of one prefill: a forward of ``lm`` (a Hugging Face causal LM) over ``n_tokens`` random
    token ids (batch 1, no gradients, no KV cache kept), one untimed warm-up, then the median of ``repeats`` timed
    runs, divided by ``n_tokens``."""
    import torch

    vocab = int(vocab_size or lm.config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, int(n_tokens)), generator=generator).to(device)
    lm = lm.to(device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    samples = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            lm(input_ids=ids, use_cache=False)
            sync()
            if i:  # the first run warms caches and kernels
                samples.append(time.perf_counter() - start)
    median = statistics.median(samples)
    detail = (f"measured: forward of the reader's language model over {n_tokens} tokens on {device}, "
              f"median of {repeats} runs = {median:.6g} s, divided by {n_tokens} tokens")
    logger.info("prefill %s", detail)
    return PrefillCost(median / n_tokens, "measured", detail, int(n_tokens), tuple(samples))


def given_prefill(s_per_token: float) -> PrefillCost:
    return PrefillCost(float(s_per_token), "given", f"given: {s_per_token:g} s per token (--prefill-s-per-token)")


def no_prefill(why: str) -> PrefillCost:
    return PrefillCost(None, "unavailable", f"unavailable: {why}")


# ---------------------------------------------------------------------------------------------- per memory
def prefix_rows(method: str, m: int, n_context_tokens: int) -> int:
    """Positions the READ of this memory places before the question (see PREFIX_ROWS)."""
    rule = PREFIX_ROWS.get(method)
    if rule is None:
        raise ValueError(f"unknown method {method!r}; known: {sorted(PREFIX_ROWS)}")
    return {"m": m, "n_context_tokens": n_context_tokens, "zero": 0}[rule]


def memory_costs(row: Mapping[str, Any], *, m: int, d: int, element_bytes: int, part_bytes_share: float | None,
                 geometry: KVGeometry | None, method: str | None, prefill: PrefillCost) -> dict[str, Any]:
    """The figures of one memory row (see the module docstring). ``geometry`` and ``method`` are None when the
    row's reader is not the one given: its KV bytes, tokens saved and break-even are then None."""
    n = int(row["n_context_tokens"])
    write_s = float(row["write_time_s"])
    out: dict[str, Any] = {
        "memory_id": row["memory_id"], "doc_id": row["doc_id"], "chunk": int(row["chunk"]),
        "revision": int(row.get("revision") or 0), "current": True,
        "reader_fingerprint": row["reader_fingerprint"], "write_steps": int(row["write_steps"]),
        "write_lr": float(row["write_lr"]), "n_context_tokens": n, "write_s": write_s,
        "tensor_bytes": m * d * element_bytes, "part_bytes_share": part_bytes_share,
        "kv_bytes": None, "prefix_rows": None, "tokens_saved": None, "prefill_s_saved": None,
        "break_even_queries": None,
    }
    if geometry is None or method is None:
        return out
    rows = prefix_rows(method, m, n)
    saved = n - rows
    out.update(kv_bytes=geometry.kv_bytes(n), prefix_rows=rows, tokens_saved=saved)
    if prefill.s_per_token is not None:
        saved_s = saved * prefill.s_per_token
        out["prefill_s_saved"] = saved_s
        out["break_even_queries"] = write_s / saved_s if saved_s > 0 else None
    return out


# ---------------------------------------------------------------------------------------------- summaries
SUMMED = ("write_s", "tensor_bytes", "part_bytes_share", "kv_bytes", "n_context_tokens", "tokens_saved",
          "prefill_s_saved")
AVERAGED = SUMMED + ("break_even_queries",)


def _values(items: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [x[key] for x in items if x[key] is not None]


def summarize(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Count, totals, means and medians over memory figures. A figure no memory has (another reader's rows, no
    prefill cost) is None; an empty list of memories gives zeros (break-even None: nothing was written)."""
    out: dict[str, Any] = {"memories": len(items), "superseded": sum(1 for x in items if not x.get("current", True))}
    for key in SUMMED:
        values = _values(items, key)
        out[f"total_{key}"] = sum(values) if values or not items else None
    for key in AVERAGED:
        values = _values(items, key)
        out[f"mean_{key}"] = statistics.fmean(values) if values else (0.0 if not items else None)
        out[f"median_{key}"] = statistics.median(values) if values else (0.0 if not items else None)
    out["memories_that_never_pay"] = sum(1 for x in items if x["tokens_saved"] is not None and x["tokens_saved"] <= 0)
    saved = out["total_prefill_s_saved"]
    out["break_even_queries"] = (out["total_write_s"] / saved) if saved else None
    kv, tensor = out["total_kv_bytes"], out["total_tensor_bytes"]
    out["kv_bytes_per_tensor_byte"] = kv / tensor if kv is not None and tensor else None
    return out


def group_key(item: Mapping[str, Any]) -> tuple[str, int, float]:
    return item["reader_fingerprint"], item["write_steps"], item["write_lr"]


def account(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"store": summary of every memory, "groups": [one summary per (reader, steps, lr)]}``."""
    keys = sorted({group_key(x) for x in items})
    groups = [{"reader_fingerprint": fp, "write_steps": steps, "write_lr": lr,
               **summarize([x for x in items if group_key(x) == (fp, steps, lr)])} for fp, steps, lr in keys]
    return {"store": summarize(items), "groups": groups}


# ---------------------------------------------------------------------------------------------- the printed table
def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if abs(value) >= size:
                return f"{value / size:.2f} {unit}"
        return f"{value:.0f} B"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


STORE_FIGURES = (  # (label, key in a summary, kind)
    ("memories", "memories", ""), ("write s (total)", "total_write_s", ""), ("write s (mean)", "mean_write_s", ""),
    ("write s (median)", "median_write_s", ""), ("tensor bytes (total)", "total_tensor_bytes", "bytes"),
    ("Parquet bytes on disk (total)", "total_part_bytes_share", "bytes"),
    ("KV-cache bytes (total)", "total_kv_bytes", "bytes"), ("KV bytes per tensor byte", "kv_bytes_per_tensor_byte", ""),
    ("context tokens (total)", "total_n_context_tokens", ""),
    ("tokens saved per query (mean)", "mean_tokens_saved", ""),
    ("tokens saved per query (median)", "median_tokens_saved", ""),
    ("prefill s saved per query (mean)", "mean_prefill_s_saved", ""),
    ("break-even queries (all memories)", "break_even_queries", ""),
    ("break-even queries (median memory)", "median_break_even_queries", ""),
    ("memories that never pay", "memories_that_never_pay", ""),
)
MEMORY_COLUMNS = (("doc_id", "doc_id", ""), ("chunk", "chunk", ""), ("tokens", "n_context_tokens", ""),
                  ("write s", "write_s", ""), ("tensor bytes", "tensor_bytes", ""),
                  ("Parquet bytes (share)", "part_bytes_share", ""), ("KV bytes", "kv_bytes", ""),
                  ("prefix rows", "prefix_rows", ""), ("tokens saved", "tokens_saved", ""),
                  ("prefill s saved", "prefill_s_saved", ""), ("break-even queries", "break_even_queries", ""))


def render(report: Mapping[str, Any], per_memory: int) -> str:
    """The report as markdown: where the figures come from, the store (and each group when there are several),
    then the first ``per_memory`` memories."""
    reader, prefill = report["reader"], report["prefill"]
    superseded = report["store"].get("superseded") or 0
    lines = [f"store: {report['store_uri']} ({report['store']['memories']} memories in {report['parts']} parts, "
             f"{report['skipped_parts']} unreadable parts skipped"
             + (f"; {superseded} replaced by a repair: counted in write seconds and bytes, saving nothing per query"
                if superseded else "") + ")"]
    if reader.get("geometry"):
        g = reader["geometry"]
        lines.append(f"reader: {reader['dir']} ({reader['fingerprint']}, method {reader['method']}): KV cache = 2 x "
                     f"{g['layers']} layers x {g['kv_heads']} KV heads x {g['head_dim']} head dim x {g['dtype']} "
                     f"({g['bytes_per_element']} B, dtype from {g['dtype_source']}) = "
                     f"{g['bytes_per_token']} B per token")
    else:
        lines.append(f"reader: {reader.get('why') or 'none'}: KV bytes, tokens saved and break-even are not reported")
    lines.append(f"prefill cost: {prefill['detail']}")
    lines.append("bytes on disk: each part's file size split evenly over its rows; tensor bytes: m x d x 4 (float32)")
    groups = report["groups"]
    columns = ["store"] + ([f"{g['reader_fingerprint'][:16]} K={g['write_steps']} lr={g['write_lr']:g}" for g in groups]
                           if len(groups) > 1 else [])
    summaries = [report["store"]] + (groups if len(groups) > 1 else [])
    lines += ["", _table(["figure", *columns],
                         [[label, *(_fmt(s[key], kind) for s in summaries)] for label, key, kind in STORE_FIGURES])]
    shown = report["memories"][:per_memory]
    if shown:
        lines += ["", f"first {len(shown)} of {len(report['memories'])} memories:",
                  _table([label for label, _, _ in MEMORY_COLUMNS],
                         [[_fmt(x[key], kind) for _, key, kind in MEMORY_COLUMNS] for x in shown])]
    return "\n".join(lines)


def write_json(report: Mapping[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# ---------------------------------------------------------------------------------------------- reading a store
ROW_COLUMNS = ("memory_id", "doc_id", "chunk", "n_context_tokens", "write_steps", "write_lr", "write_time_s",
               "revision")  # revision: absent from parts written before it (read as 0)


@dataclass(frozen=True)
class PartRows:
    """One readable memories part: its rows (the columns costs need; never the memory tensors), shape and size."""

    path: str
    size_bytes: int
    fingerprint: str
    m: int
    d: int
    element_bytes: int
    rows: list[dict[str, Any]]


def read_parts(store) -> list[PartRows]:
    """Every readable memories part of a ``gradmem.store.MemoryStore`` (unreadable ones are skipped and counted
    in ``store.skipped``, as everywhere). m, d and the element size come from the part's tensor type, the reader
    fingerprint from its schema metadata."""
    import pyarrow.parquet as pq

    out = []
    fingerprints = store.fingerprints("memories")
    for path in store.valid_parts("memories"):
        table = store.read("memories", ROW_COLUMNS, parts=[path])
        if table is None:
            continue
        tensor_type = pq.read_schema(path, filesystem=store.fs).field("memory").type
        m, d = (int(x) for x in tensor_type.shape)
        fingerprint = fingerprints.get(path, "")
        rows = [{**{c: None for c in ROW_COLUMNS}, **row, "reader_fingerprint": fingerprint} for row in table.to_pylist()]
        whole = [r for r in rows if all(r[c] is not None for c in ROW_COLUMNS if c != "revision")]
        if len(whole) < len(rows):  # a hand-made or damaged part: its rows without a figure are left out, said so
            logger.warning("%s: %d of %d rows lack a figure the report needs; left out", path, len(rows) - len(whole),
                           len(rows))
        rows = whole
        out.append(PartRows(path, int(store.fs.get_file_info(path).size), fingerprint, m, d,
                            tensor_type.value_type.bit_width // 8, rows))
    return out


SAVINGS = ("kv_bytes", "prefix_rows", "tokens_saved", "prefill_s_saved", "break_even_queries")


def mark_superseded(items: list[dict[str, Any]]) -> None:
    """Mark (``current`` False) every memory a repair has replaced: a lower revision of the same (reader, doc_id,
    chunk), as ``gradmem.store`` decides. It stays in the totals of write seconds and bytes (it was paid for and is
    still stored) but saves nothing per query (it is never read again): its savings figures become None."""
    top: dict[tuple, int] = {}
    for x in items:
        key = (x["reader_fingerprint"], x["doc_id"], x["chunk"])
        top[key] = max(top.get(key, 0), x["revision"])
    for x in items:
        if x["revision"] < top[(x["reader_fingerprint"], x["doc_id"], x["chunk"])]:
            x.update(current=False, **dict.fromkeys(SAVINGS))


def build_report(store_uri: str, parts: Sequence[PartRows], skipped_parts: int, reader: Mapping[str, Any],
                 geometry: KVGeometry | None, prefill: PrefillCost) -> dict[str, Any]:
    """The whole report (what the job prints and writes as JSON). ``reader``: dir, fingerprint, method (or why
    there is none); reader-dependent figures are filled for the rows of that fingerprint only."""
    items = []
    for part in parts:
        share = part.size_bytes / len(part.rows) if part.rows else None
        same = geometry is not None and part.fingerprint == reader.get("fingerprint")
        for row in part.rows:
            items.append(memory_costs(row, m=part.m, d=part.d, element_bytes=part.element_bytes,
                                      part_bytes_share=share, geometry=geometry if same else None,
                                      method=reader.get("method") if same else None, prefill=prefill))
    mark_superseded(items)
    other = sorted({p.fingerprint for p in parts} - {reader.get("fingerprint")})
    if geometry is not None and other:
        logger.warning("rows of readers %s are not priced: the reader given is %s", other, reader.get("fingerprint"))
    summary = account(items)
    unpriced = other if geometry else sorted({p.fingerprint for p in parts})
    return {
        "store_uri": store_uri, "parts": len(parts), "skipped_parts": skipped_parts,
        "part_bytes": sum(p.size_bytes for p in parts),
        "reader": {**reader, "geometry": {**asdict(geometry), "bytes_per_token": geometry.bytes_per_token}
                   if geometry else None, "unpriced_fingerprints": unpriced},
        "prefill": asdict(prefill),
        "store": summary["store"], "groups": summary["groups"], "memories": items,
    }
