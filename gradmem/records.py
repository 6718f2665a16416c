"""The memory record: one Arrow row per written context, stored as Parquet, readable without Ray or pickle.

Columns
    memory_id        content hash of (reader fingerprint, write steps, write lr, the adaptive target and min steps if
                     any, the write precision if not float32, context token ids): a rerun with the same reader and
                     settings produces the same id, so it can skip what exists
    doc_id           the caller's id; chunk, n_chunks: the chunk's index within its document and the document's
                     chunk count (0 and 1 when not chunked)
    memory           the (m, d) memory as Arrow's canonical fixed-shape tensor extension (arrow.fixed_shape_tensor)
    n_context_tokens, write_steps, write_lr, write_losses (loss before each step taken, then after the last),
    write_target     an adaptive write's target accuracy (null: a fixed-K write); write_steps is then K_max
    write_min_steps  the steps every context of an adaptive write took before the target was checked (0: fixed K)
    write_precision  the WRITE's arithmetic (``gradmem.memory.WRITE_PRECISIONS``); tables written before the column
                     existed hold float32 writes
    steps_used       SGD steps this memory got (write_steps for a fixed-K write; fewer when an adaptive write met
                     its target early). Tables written before these two columns existed load as fixed-K writes.
    recon_accuracy   teacher-forced reconstruction accuracy of the final memory
    recon_greedy     free-running (greedy) reconstruction accuracy with the write head; null when not measured
    write_time_s     seconds of WRITE per context (a batch's time shared by its contexts)
    revision         0 for a document's first memory by a reader; a repair (pipelines/maintain.py) writes the next
                     revision of the same (doc_id, chunk) from the same text. The current memory of a (doc_id,
                     chunk) for a reader is its highest revision (``gradmem.store.current_memories``): publishing
                     the repaired part is the switch. Tables written before the column existed hold revision 0.
Schema metadata: gradmem.format_version, gradmem.m, gradmem.d, gradmem.dtype, gradmem.reader_fingerprint, and
gradmem.chunk_tokens, gradmem.chunk_overlap: how the documents were split into chunks (``gradmem.chunking``; absent
in parts written before chunkings were recorded).

``to_table`` builds the table from ``Memories``; ``from_table`` loads it back into ``Memories`` and refuses a
table written by another reader or in another format version.

The errors table (``error_table``) sits beside the memories: one row per input that did not become a memory,
with a reason code from ``ERROR_REASONS``, a message and an excerpt, so a batch job never drops an input.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from gradmem.chunking import Chunking
from gradmem.memory import Memories, WriteSetting, WriteStats, check_precision

RECORD_FORMAT_VERSION = 1
_META = "gradmem."
# The longest doc_id (in characters) anything accepts: the service refuses longer ids with 422, and compression
# must refuse them too, or a stored document could never be asked for by its doc_id. One constant for both.
MAX_ID_CHARS = 1024


def safe_text(value: str | None) -> str | None:
    """``value`` with anything UTF-8 cannot encode (lone surrogates from JSON escapes like "\\ud800") written as
    backslash escapes: error messages and excerpts quote bad input, and Parquet strings must be valid UTF-8."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


# The columns of a memory's write setting, and the one reading of them: parts and manifests written before the
# adaptive and precision columns existed hold fixed-K float32 writes (target None, min steps 0, float32)
SETTING_COLUMNS = ("write_steps", "write_lr", "write_target", "write_min_steps", "write_precision")


def write_setting(row: Mapping[str, Any]) -> WriteSetting:
    """The write setting of a memory row or a manifest (keys ``SETTING_COLUMNS``), with what older parts lack
    (absent or null) read as they were written. Values as stored, unchecked: a store is compared, not trusted."""
    return WriteSetting(row.get("write_steps"), row.get("write_lr"), row.get("write_target"),
                        row.get("write_min_steps") or 0, row.get("write_precision") or "float32")


def setting_columns(setting: WriteSetting) -> dict[str, Any]:
    """``SETTING_COLUMNS`` -> the setting's values: what a part's rows and a manifest record (``write_setting``
    reads them back)."""
    return dict(zip(SETTING_COLUMNS, (setting.steps, setting.lr, setting.target, setting.min_steps, setting.precision)))


def memory_id(fingerprint: str, setting: WriteSetting, token_ids: Sequence[int]) -> str:
    """Content address of a memory: same reader, setting and tokens -> same id, in any process. A fixed-K
    float32 write (``target`` None) keeps the id it had before adaptive writes and precisions existed."""
    adaptive = [float(setting.target), int(setting.min_steps)] if setting.target is not None else []
    arithmetic = [check_precision(setting.precision)] if setting.precision != "float32" else []
    parts = [fingerprint, int(setting.steps), float(setting.lr)] + adaptive + arithmetic
    digest = hashlib.sha256(json.dumps(parts).encode())
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


def schema(m: int, d: int, fingerprint: str, chunking: Chunking | None = None) -> pa.Schema:
    fields = [
        pa.field("memory_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("n_chunks", pa.int32(), nullable=False),
        pa.field("memory", pa.fixed_shape_tensor(pa.float32(), [m, d]), nullable=False),
        pa.field("n_context_tokens", pa.int32(), nullable=False),
        pa.field("write_steps", pa.int32(), nullable=False),
        pa.field("write_lr", pa.float64(), nullable=False),
        pa.field("write_losses", pa.list_(pa.float32()), nullable=False),
        pa.field("write_target", pa.float64(), nullable=True),
        pa.field("write_min_steps", pa.int32(), nullable=False),
        pa.field("write_precision", pa.string(), nullable=False),
        pa.field("steps_used", pa.int32(), nullable=False),
        pa.field("recon_accuracy", pa.float32(), nullable=False),
        pa.field("recon_greedy", pa.float32(), nullable=True),
        pa.field("write_time_s", pa.float64(), nullable=False),
        pa.field("revision", pa.int32(), nullable=False),
    ]
    metadata = {"format_version": RECORD_FORMAT_VERSION, "m": m, "d": d, "dtype": "float32",
                "reader_fingerprint": fingerprint, **(chunking.metadata() if chunking is not None else {})}
    return pa.schema(fields, metadata={f"{_META}{k}": str(v) for k, v in metadata.items()})


def to_table(
    memories: Memories, doc_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
    write_time_s: Sequence[float] | float = 0.0, chunks: Sequence[int] | None = None,
    n_chunks: Sequence[int] | None = None, recon_greedy: Sequence[float] | None = None,
    memory_ids: Sequence[str] | None = None, chunking: Chunking | None = None,
    revisions: Sequence[int] | None = None,
) -> pa.Table:
    """One row per memory. ``token_ids`` are the context tokens that were written (they define memory_id).
    ``memory_ids``: those ids when the caller already computed them with ``memory_id`` for these memories'
    reader and write setting (the batch job does, to skip what the store holds); None: computed here.
    ``chunking``: the store's chunking, recorded in the schema metadata (None: not recorded).
    ``revisions``: each memory's revision (None: 0, a first write)."""
    n = len(memories)
    if not (len(doc_ids) == len(token_ids) == n) or (memory_ids is not None and len(memory_ids) != n):
        raise ValueError(f"need one doc_id and one token list per memory: {n} memories, {len(doc_ids)} ids, "
                         f"{len(token_ids)} token lists")
    _, m, d = memories.tensor.shape
    times = [float(write_time_s)] * n if isinstance(write_time_s, (int, float)) else [float(t) for t in write_time_s]
    tensor = memories.tensor.detach().to(torch.float32).cpu().numpy()  # (B, m, d)
    used = memories.steps_used.tolist()
    losses = memories.stats.losses.float().tolist()
    if memories.setting.target is not None:  # the steps taken only: the rest repeat the final loss (padded back on load)
        losses = [row[: k + 1] for row, k in zip(losses, used)]
    columns = {
        "memory_id": list(memory_ids) if memory_ids is not None else [
            memory_id(memories.fingerprint, memories.setting, t) for t in token_ids],
        "doc_id": [str(x) for x in doc_ids],
        "chunk": list(chunks) if chunks is not None else [0] * n,
        "n_chunks": list(n_chunks) if n_chunks is not None else [1] * n,
        "memory": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(tensor)),
        "n_context_tokens": memories.stats.n_tokens.tolist(),
        **{name: [value] * n for name, value in setting_columns(memories.setting).items()},
        "write_losses": losses,
        "steps_used": used,
        "recon_accuracy": memories.stats.accuracy.float().tolist(),
        "recon_greedy": [float(x) for x in recon_greedy] if recon_greedy is not None else [None] * n,
        "write_time_s": times,
        "revision": [int(r) for r in revisions] if revisions is not None else [0] * n,
    }
    sch = schema(m, d, memories.fingerprint, chunking)
    return pa.table([pa.array(columns[f.name], type=f.type) if f.name != "memory" else columns["memory"] for f in sch],
                    schema=sch)


def table_metadata(table_or_schema: pa.Table | pa.Schema) -> dict[str, str]:
    sch = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = sch.metadata or {}
    return {k.decode()[len(_META):]: v.decode() for k, v in raw.items() if k.decode().startswith(_META)}


def from_table(table: pa.Table, fingerprint: str | None = None) -> tuple[list[str], Memories]:
    """Doc ids and ``Memories`` from a record table. With ``fingerprint``, refuse records of another reader."""
    meta = table_metadata(table)
    if not meta:
        raise ValueError("not a GradMem memory table: its schema carries no gradmem.* metadata")
    if meta.get("format_version") != str(RECORD_FORMAT_VERSION):
        raise ValueError(f"memory record format {meta.get('format_version')!r} is not supported "
                         f"(expected {RECORD_FORMAT_VERSION})")
    written_by = meta["reader_fingerprint"]
    if fingerprint is not None and written_by != fingerprint:
        raise ValueError(f"these memories were written by reader {written_by}, not by this reader ({fingerprint})")
    missing = {"doc_id", "memory", "write_steps", "write_lr", "write_losses", "recon_accuracy", "n_context_tokens"} - set(table.column_names)
    if missing:
        raise ValueError(f"malformed memory table: missing columns {sorted(missing)}")
    step_values = table.column("write_steps").to_pylist()
    present = [c for c in SETTING_COLUMNS if c in table.column_names]  # a table from before a column: its default
    settings = {write_setting(r) for r in table.select(present).to_pylist()}
    if len(settings) > 1:
        raise ValueError("one Memories object holds one write setting; this table mixes "
                         + "; ".join(sorted(s.describe() for s in settings)))
    setting = settings.pop() if settings else WriteSetting(0, 0.0)
    check_precision(setting.precision)
    memory = table.column("memory").combine_chunks().to_numpy_ndarray()  # (B, m, d)
    if memory.shape[1:] != (int(meta["m"]), int(meta["d"])):
        raise ValueError(f"memory shape {memory.shape[1:]} does not match the metadata ({meta['m']}, {meta['d']})")
    used = _column(table, "steps_used", step_values)
    stats = WriteStats(
        losses=_carried_forward(table.column("write_losses").to_pylist()),
        accuracy=torch.tensor(table.column("recon_accuracy").to_pylist(), dtype=torch.float32),
        n_tokens=torch.tensor(table.column("n_context_tokens").to_pylist()),
        steps_used=torch.tensor(used, dtype=torch.long) if setting.target is not None else None,
    )
    memories = Memories(torch.from_numpy(np.array(memory)), stats, written_by, setting)
    return table.column("doc_id").to_pylist(), memories


def _column(table: pa.Table, name: str, default: list) -> list:
    """A column's values, or ``default`` for a table written before the column existed."""
    return table.column(name).to_pylist() if name in table.column_names else default


def _carried_forward(rows: list[list[float]]) -> torch.Tensor:
    """(B, S) write losses from per-row lists of varying length (an adaptive write stores the steps it took):
    each row padded with its last loss, which is what the memory's loss stays at once it stops changing."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + r[-1:] * (width - len(r)) for r in rows], dtype=torch.float32).reshape(len(rows), width)


# ---------------------------------------------------------------------------------------------- errors
ERROR_REASONS = {
    "empty": "the text is empty or only whitespace: there is nothing to write",
    "too_long": "the text has more tokens than the reader accepts (use --chunk to split it)",
    "malformed": "the record cannot be parsed or lacks an id or a text",
    "not_text": "the text is not a string (or not UTF-8)",
    "duplicate_id": "another record earlier in the input has the same id",
    "non_finite": "the WRITE produced NaN or inf",
    "conflict": "the store already holds this id with other content (an online write, or a run on another text); "
                "it is never replaced: write the new text under a new id",
}


def error_schema(fingerprint: str) -> pa.Schema:
    fields = [
        pa.field("error_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string()),
        pa.field("chunk", pa.int32()),
        pa.field("n_chunks", pa.int32()),
        pa.field("source", pa.string(), nullable=False),  # file:line (jsonl), file#row (Parquet) or file (.txt)
        pa.field("reason", pa.string(), nullable=False),  # a key of ERROR_REASONS
        pa.field("message", pa.string(), nullable=False),
        pa.field("excerpt", pa.string()),
    ]
    metadata = {"format_version": RECORD_FORMAT_VERSION, "kind": "errors", "reader_fingerprint": fingerprint}
    return pa.schema(fields, metadata={f"{_META}{k}": str(v) for k, v in metadata.items()})


def error_id(source: str, doc_id: str | None, chunk: int | None, reason: str) -> str:
    """Stable id of an error row, so a rerun recognises the errors it already recorded (the same for a value and
    its ``safe_text``, which is what the row stores)."""
    return hashlib.sha256(json.dumps([safe_text(source), safe_text(doc_id), chunk, reason]).encode()).hexdigest()[:32]


def error_table(rows: Sequence[dict], fingerprint: str) -> pa.Table:
    """Rows with source, reason, message and optionally doc_id, chunk, n_chunks, excerpt."""
    sch = error_schema(fingerprint)
    for row in rows:
        if row["reason"] not in ERROR_REASONS:
            raise ValueError(f"unknown error reason {row['reason']!r}; known: {sorted(ERROR_REASONS)}")
    text_fields = {f.name for f in sch if pa.types.is_string(f.type)}
    full = []
    for r in rows:
        row = {f.name: safe_text(r.get(f.name)) if f.name in text_fields else r.get(f.name) for f in sch}
        row["error_id"] = error_id(row["source"], row["doc_id"], row["chunk"], row["reason"])
        full.append(row)
    return pa.Table.from_pylist(full, schema=sch)
