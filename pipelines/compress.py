"""Batch compression on Ray Data: a corpus in, one memory per document (or chunk) out, nothing lost.

    files (jsonl / Parquet / .txt, local or s3://)
      -> read_binary_files                      one block per file, streamed
      -> parse          (tasks)                 records with a stable order key and a source (file:line)
      -> prepare        (tasks)                 validate, tokenize, chunk, content-address, skip what exists
      -> MemoryWriter   (ActorPoolStrategy)     reader loaded once per actor; length-bucketed inference
                                                WRITEs; each call writes its memory and error parts at once
      -> driver                                 progress (documents/s, ETA), then the manifest

Guarantees
- Every input record ends as memories or as error rows with a reason (``gradmem.records.ERROR_REASONS``); the
  manifest checks ``inputs + extra_chunks == memories + errors`` over the store (``extra_chunks`` is 0
  without ``chunk``).
- Duplicate ids: a first pass over the ids (a Ray Data group-by) finds them; the first record in input order
  (files sorted by path, then line) wins, later ones become ``duplicate_id`` errors. The input is read twice
  for this; the first pass is cheap next to the WRITEs.
- Reruns and restarts: memories are keyed by (doc_id, chunk, memory_id) and errors by error_id; whatever the
  store already holds is skipped before it reaches a writer, and parts are immutable, content-named and
  published atomically (``gradmem.store``), so a run killed at any point and started again ends with every
  record exactly once. One output store holds one reader and one write setting; another is refused.

Not supported: two jobs writing the same output at once (the manifest would report the duplicates).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradmem import records
from gradmem.reader import ReaderSpec
from gradmem.store import MemoryStore
from pipelines.storage import local_dir, resolve

logger = logging.getLogger(__name__)

INPUT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}
EXCERPT_CHARS = 200
_LINE_BITS = 32  # order key = file index << 32 | record index within the file


@dataclass
class CompressConfig:
    """One compression run. ``steps``/``lr`` default to the reader's own WRITE settings."""

    reader: str  # reader directory (local or s3://)
    input: str  # a file or a directory of .jsonl/.json/.parquet/.txt (local or s3://)
    output: str  # the memory store root (local or s3://)
    steps: int | None = None
    lr: float | None = None
    batch_size: int = 32  # contexts per WRITE batch
    batches_per_call: int = 8  # WRITE batches per actor call: the pool a call sorts by length (bucketing)
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    cpus_per_prepare_task: float = 0.5  # parse + tokenize tasks (cheap; a different request keeps them unfused)
    chunk: bool = False  # split over-long documents into several memories instead of rejecting them
    greedy_check: bool = True  # measure free-running reconstruction accuracy (one decoding step per token)
    compile: bool = False  # torch.compile the backbone in each writer (pays off on large corpora)
    s3_endpoint: str | None = None
    progress_every_s: float = 10.0

    def validate(self) -> None:
        for name in ("batch_size", "batches_per_call", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor must be > 0 and gpus_per_actor >= 0")


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFile:
    index: int
    path: str  # inside the filesystem
    kind: str  # jsonl | parquet | txt
    name: str  # relative to the input root: shown in sources, and the id of a .txt document


def list_inputs(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, list[InputFile]]:
    """The input files in a stable order. Names starting with '.' or '_' (markers, temporaries) are skipped,
    and so, with a warning, are files of other types."""
    store = resolve(uri, s3_endpoint)
    info = store.filesystem.get_file_info(store.path)
    if info.type == pafs.FileType.File:
        infos, root = [info], str(PurePosixPath(store.path).parent)
    elif info.type == pafs.FileType.Directory:
        infos = [i for i in store.filesystem.get_file_info(pafs.FileSelector(store.path, recursive=True))
                 if i.type == pafs.FileType.File]
        root = store.path
    else:
        raise FileNotFoundError(f"input {uri} does not exist")
    files = []
    for i in sorted(infos, key=lambda x: x.path):
        name = i.path[len(root):].lstrip("/")
        if any(part.startswith((".", "_")) for part in name.split("/")):
            continue
        kind = INPUT_SUFFIXES.get(PurePosixPath(i.path).suffix.lower())
        if kind is None:
            logger.warning("skipping %s: not one of %s", i.path, sorted(INPUT_SUFFIXES))
            continue
        files.append(InputFile(len(files), i.path, kind, name))
    if not files:
        raise FileNotFoundError(f"input {uri} holds no {'/'.join(sorted(INPUT_SUFFIXES))} files")
    return store.filesystem, files


_PARSED = pa.schema([
    ("order", pa.int64()), ("source", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
    ("reason", pa.string()), ("message", pa.string()), ("excerpt", pa.string()),
])


def _record(order: int, source: str, doc_id=None, text=None, reason=None, message=None, excerpt=None) -> dict:
    return {"order": order, "source": source, "doc_id": doc_id, "text": text, "reason": reason,
            "message": message, "excerpt": excerpt[:EXCERPT_CHARS] if excerpt else excerpt}


def _parse_jsonl(f: InputFile, data: bytes) -> list[dict]:
    lines = data.split(b"\n")
    if lines and lines[-1].strip() == b"":
        lines.pop()  # the newline that ends the last record
    out = []
    for n, raw in enumerate(lines):
        order, source = (f.index << _LINE_BITS) | n, f"{f.name}:{n + 1}"
        excerpt = raw[:EXCERPT_CHARS].decode("utf-8", "replace")
        try:
            row = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            out.append(_record(order, source, reason="malformed", message=f"not a JSON object: {e}", excerpt=excerpt))
            continue
        out.append(_check_row(order, source, row, excerpt))
    return out


def _check_row(order: int, source: str, row: Any, excerpt: str | None) -> dict:
    if not isinstance(row, dict):
        return _record(order, source, reason="malformed", message=f"a record must be an object, got {type(row).__name__}",
                       excerpt=excerpt)
    doc_id = row.get("id")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        return _record(order, source, reason="malformed", message=f"missing or invalid 'id' ({doc_id!r}): need a "
                       "non-empty string or an integer", excerpt=excerpt)
    doc_id = str(doc_id)
    if "text" not in row:
        return _record(order, source, doc_id, reason="malformed", message="missing field 'text'", excerpt=excerpt)
    text = row["text"]
    if not isinstance(text, str):
        return _record(order, source, doc_id, reason="not_text", message=f"'text' is {type(text).__name__}, not a string",
                       excerpt=excerpt)
    return _record(order, source, doc_id, text)


def _parse_parquet(f: InputFile, data: bytes) -> list[dict]:
    order0 = f.index << _LINE_BITS
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any unreadable file is one error row, never a crash
        return [_record(order0, f.name, reason="malformed", message=f"unreadable Parquet: {e}")]
    missing = {"id", "text"} - set(table.column_names)
    if missing:
        return [_record(order0, f.name, reason="malformed", message=f"Parquet file lacks columns {sorted(missing)}")]
    out = []
    for n, row in enumerate(table.select(["id", "text"]).to_pylist()):
        order, source = order0 | n, f"{f.name}#{n}"
        excerpt = str(row["text"])[:EXCERPT_CHARS] if row["text"] is not None else None
        out.append(_check_row(order, source, row, excerpt))
    return out


def _parse_txt(f: InputFile, data: bytes) -> list[dict]:
    doc_id = f.name[: -len(".txt")] if f.name.lower().endswith(".txt") else f.name
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [_record(f.index << _LINE_BITS, f.name, doc_id, reason="not_text", message=f"not UTF-8 text: {e}",
                        excerpt=data[:EXCERPT_CHARS].decode("utf-8", "replace"))]
    return [_record(f.index << _LINE_BITS, f.name, doc_id, text)]


_PARSERS = {"jsonl": _parse_jsonl, "parquet": _parse_parquet, "txt": _parse_txt}


def parse(batch: pa.Table, files: dict[str, InputFile]) -> pa.Table:
    """File blocks (bytes, path) -> one row per input record (Ray Data task)."""
    rows: list[dict] = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        f = files[path]
        rows.extend(_PARSERS[f.kind](f, data))
    return pa.Table.from_pylist(rows, schema=_PARSED)


# ---------------------------------------------------------------------------------------------- prepare
_PREPARED = pa.schema([
    ("order", pa.int64()), ("source", pa.string()), ("doc_id", pa.string()), ("chunk", pa.int32()),
    ("n_chunks", pa.int32()), ("token_ids", pa.list_(pa.int32())), ("memory_id", pa.string()),
    ("reason", pa.string()), ("message", pa.string()), ("excerpt", pa.string()),
])
_TOKENIZERS: dict[str, Any] = {}
_EXISTING: dict[str, tuple[set, set]] = {}


def _tokenizer(reader_uri: str, s3_endpoint: str | None):
    if reader_uri not in _TOKENIZERS:
        from transformers import AutoTokenizer

        path = local_dir(reader_uri, s3_endpoint, skip_suffixes=(".safetensors", ".bin"))
        _TOKENIZERS[reader_uri] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[reader_uri]


def _existing(ref) -> tuple[set, set]:
    """The store's (doc_id, chunk, memory_id) keys and error ids, fetched once per worker process (an object
    ref, or the pair itself when called outside Ray)."""
    if isinstance(ref, tuple):
        return ref
    import ray

    key = ref.hex()
    if key not in _EXISTING:
        _EXISTING.clear()
        _EXISTING[key] = ray.get(ref)
    return _EXISTING[key]


def prepare(batch: pa.Table, reader_uri: str, s3_endpoint: str | None, spec: dict, steps: int, lr: float,
            chunk: bool, duplicates: dict[str, tuple[int, str]], existing_ref) -> pa.Table:
    """Validate, tokenize, chunk and content-address records; drop what the store already holds (Ray Data task)."""
    from gradmem.data import tokenize

    tokenizer = _tokenizer(reader_uri, s3_endpoint)
    memory_keys, error_ids = _existing(existing_ref)
    limit = spec["max_context_tokens"]
    out: list[dict] = []

    def error(row: dict, reason: str, message: str, **extra) -> None:
        eid = records.error_id(row["source"], row["doc_id"], extra.get("chunk"), reason)
        if eid not in error_ids:
            out.append({"order": row["order"], "source": row["source"], "doc_id": row["doc_id"], "reason": reason,
                        "message": message, "excerpt": (row.get("excerpt") or (row.get("text") or "")[:EXCERPT_CHARS]),
                        **extra})

    rows = batch.to_pylist()
    texts = [r["text"] if r["reason"] is None and r["text"].strip() else "" for r in rows]
    token_lists = tokenize(tokenizer, [t for t in texts if t])
    tokens_iter = iter(token_lists)
    for row, text in zip(rows, texts):
        ids = next(tokens_iter) if text else None
        if row["reason"] is not None:
            error(row, row["reason"], row["message"])
            continue
        first = duplicates.get(row["doc_id"])
        if first is not None and first[0] != row["order"]:
            error(row, "duplicate_id", f"id {row['doc_id']!r} was first used at {first[1]}")
            continue
        if not text or not ids:
            error(row, "empty", records.ERROR_REASONS["empty"])
            continue
        if len(ids) > limit and not chunk:
            error(row, "too_long", f"{len(ids)} tokens, over the reader's maximum of {limit} (use --chunk to split)")
            continue
        pieces = [ids[i : i + limit] for i in range(0, len(ids), limit)]
        for c, piece in enumerate(pieces):
            mid = records.memory_id(spec["fingerprint"], steps, lr, piece)
            if (row["doc_id"], c, mid) in memory_keys:
                continue
            if records.error_id(row["source"], row["doc_id"], c, "non_finite") in error_ids:
                continue  # a WRITE of it failed before: recorded, not retried
            out.append({"order": row["order"], "source": row["source"], "doc_id": row["doc_id"], "chunk": c,
                        "n_chunks": len(pieces), "token_ids": piece, "memory_id": mid})
    return pa.Table.from_pylist(out, schema=_PREPARED)


# ---------------------------------------------------------------------------------------------- writers
_SUMMARY = pa.schema([("memories", pa.int64()), ("errors", pa.int64()), ("documents", pa.int64()),
                      ("tokens", pa.int64()), ("padded_tokens", pa.int64()), ("write_s", pa.float64())])


class MemoryWriter:
    """A Ray Data actor: loads the reader once, WRITEs each call's contexts in length-sorted batches and
    writes that call's memory and error parts to the store before returning a one-row summary."""

    def __init__(self, reader_uri: str, s3_endpoint: str | None, output: str, steps: int, lr: float,
                 batch_size: int, greedy_check: bool, compile: bool, threads: int):
        import torch

        from gradmem import Reader
        from gradmem.runtime import configure_cpu

        configure_cpu(threads=threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reader = Reader.from_pretrained(local_dir(reader_uri, s3_endpoint), device=device)
        if compile:
            self.reader.compile()
        target = resolve(output, s3_endpoint)
        self.store = MemoryStore(target.filesystem, target.path)
        self.steps, self.lr, self.batch_size, self.greedy_check = steps, lr, batch_size, greedy_check

    def __call__(self, batch: pa.Table) -> pa.Table:
        from gradmem import NonFiniteWriteError
        from gradmem.reader import length_buckets

        rows = batch.to_pylist()
        good = [r for r in rows if r["reason"] is None]
        errors = [r for r in rows if r["reason"] is not None]
        ids = [r["token_ids"] for r in good]
        start = time.perf_counter()
        memories, keep = None, list(range(len(good)))
        if good:
            try:
                memories = self.reader.write_tokens(ids, self.steps, self.lr, self.batch_size)
            except NonFiniteWriteError as e:
                memories = e.memories
                bad = set(e.bad)
                keep = [i for i in range(len(good)) if i not in bad]
                for i in sorted(bad):
                    r = good[i]
                    errors.append({**r, "reason": "non_finite", "message": records.ERROR_REASONS["non_finite"] +
                                   f" (write losses {memories.stats.losses[i].tolist()})", "excerpt": None})
        greedy = None
        if memories is not None and keep and self.greedy_check:
            greedy = self.reader.reconstruct(memories[keep], [ids[i] for i in keep], self.batch_size).tolist()
        seconds = time.perf_counter() - start
        if memories is not None and keep:
            kept = [good[i] for i in keep]
            table = records.to_table(
                memories[keep], [r["doc_id"] for r in kept], [r["token_ids"] for r in kept],
                write_time_s=seconds / len(good), chunks=[r["chunk"] for r in kept],
                n_chunks=[r["n_chunks"] for r in kept], recon_greedy=greedy,
            )
            if table.column("memory_id").to_pylist() != [r["memory_id"] for r in kept]:
                raise RuntimeError("memory ids differ between the prepare step and the writer: the reader or the "
                                   "write settings changed under the job")
            self.store.write_part("memories", table)
        if errors:
            self.store.write_part("errors", records.error_table(errors, self.reader.fingerprint))
        padded = sum(len(b) * max(len(ids[i]) for i in b) for b in length_buckets(ids, self.batch_size))
        return pa.Table.from_pylist([{
            "memories": len(keep) if good else 0, "errors": len(errors), "documents": len(rows),
            "tokens": sum(len(x) for x in ids), "padded_tokens": padded, "write_s": seconds,
        }], schema=_SUMMARY)


# ---------------------------------------------------------------------------------------------- driver
def _check_output(store: MemoryStore, spec: ReaderSpec, steps: int, lr: float) -> None:
    """One store, one reader and one write setting: refuse to mix (memories could not be served together)."""
    prior = store.manifest()
    if prior is not None:
        theirs = (prior.get("reader_fingerprint"), prior.get("write_steps"), prior.get("write_lr"))
        if theirs != (spec.fingerprint, steps, lr):
            raise ValueError(f"output {store.root} holds memories of reader {theirs[0]} written with steps={theirs[1]}, "
                             f"lr={theirs[2]}; this run uses reader {spec.fingerprint} with steps={steps}, lr={lr}. "
                             "Use another --output.")
    schema = store.schema("memories")
    if schema is not None:
        fp = records.table_metadata(schema).get("reader_fingerprint")
        if fp != spec.fingerprint:
            raise ValueError(f"output {store.root} holds memories of reader {fp}, not of {spec.fingerprint}; "
                             "use another --output")


def _existing_keys(store: MemoryStore) -> tuple[set, set]:
    mem = store.read("memories", ["doc_id", "chunk", "memory_id"])
    err = store.read("errors", ["error_id"])
    memory_keys = set(zip(*(mem.column(c).to_pylist() for c in ("doc_id", "chunk", "memory_id")))) if mem else set()
    return memory_keys, set(err.column("error_id").to_pylist()) if err else set()


def _find_duplicates(keys, files: list[InputFile]) -> dict[str, tuple[int, str]]:
    """doc_id -> (order, source) of its first record, for ids used more than once (a Ray Data group-by)."""
    from ray.data.aggregate import Count, Min
    from ray.data.expressions import col

    partitions = max(1, min(200, keys.count() // 100_000))  # the default 200 costs seconds on small inputs
    groups = keys.groupby("doc_id", num_partitions=partitions).aggregate(Count(alias_name="n"), Min("order", alias_name="first"))
    dupes = [r for r in groups.filter(expr=col("n") > 1).take_all() if r["doc_id"] is not None]  # None: malformed rows
    by_index = {f.index: f for f in files}
    out = {}
    for row in dupes:
        first = int(row["first"])
        f = by_index[first >> _LINE_BITS]
        line = first & ((1 << _LINE_BITS) - 1)
        where = {"jsonl": f"{f.name}:{line + 1}", "parquet": f"{f.name}#{line}", "txt": f.name}[f.kind]
        out[row["doc_id"]] = (first, where)
    return out


def summarize(store: MemoryStore, inputs: int) -> dict[str, Any]:
    """Counts over the store, the duplicates it holds, and whether every input is accounted for."""
    mem = store.read("memories", ["doc_id", "chunk", "n_chunks"])
    err = store.read("errors", ["doc_id", "chunk", "n_chunks", "reason"])
    n_mem = mem.num_rows if mem is not None else 0
    n_err = err.num_rows if err is not None else 0
    reasons = {}
    if err is not None:
        for reason, count in zip(*pc.value_counts(err.column("reason")).flatten()):
            reasons[reason.as_py()] = count.as_py()
    # a document split in n chunks accounts for n rows (memories or per-chunk errors)
    chunked = {}
    for table in (mem, err):
        if table is not None:
            for doc_id, n in zip(table.column("doc_id").to_pylist(), table.column("n_chunks").to_pylist()):
                if n is not None and n > 1:
                    chunked[doc_id] = n
    extra = sum(n - 1 for n in chunked.values())
    duplicates = 0
    if mem is not None:
        counts = mem.group_by(["doc_id", "chunk"]).aggregate([([], "count_all")])
        duplicates = int(pc.sum(pc.subtract(counts.column("count_all"), 1)).as_py() or 0)
    return {"inputs": inputs, "memories": n_mem, "errors": n_err, "extra_chunks": extra,
            "error_reasons": reasons, "duplicates": duplicates,
            "complete": inputs + extra == n_mem + n_err and duplicates == 0}


def compress(cfg: CompressConfig) -> dict[str, Any]:
    """Run the pipeline on the connected Ray cluster; returns (and writes) the manifest."""
    import ray
    import ray.data

    cfg.validate()
    started = time.time()
    reader_path = local_dir(cfg.reader, cfg.s3_endpoint)
    spec = ReaderSpec.from_dir(reader_path)
    steps = spec.write_steps if cfg.steps is None else int(cfg.steps)
    lr = spec.write_lr if cfg.lr is None else float(cfg.lr)
    target = resolve(cfg.output, cfg.s3_endpoint)
    store = MemoryStore(target.filesystem, target.path)
    _check_output(store, spec, steps, lr)
    fs, files = list_inputs(cfg.input, cfg.s3_endpoint)
    by_path = {f.path: f for f in files}
    logger.info("compressing %d files from %s with reader %s (K=%d, lr=%g) into %s", len(files), cfg.input,
                spec.fingerprint, steps, lr, cfg.output)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver logs documents/s and ETA instead

    def parsed():
        raw = ray.data.read_binary_files([f.path for f in files], filesystem=fs, include_paths=True,
                                         override_num_blocks=len(files))
        return raw.map_batches(parse, fn_kwargs={"files": by_path}, batch_size=1, batch_format="pyarrow")

    keys = parsed().select_columns(["order", "doc_id"]).materialize()
    inputs = keys.count()
    duplicates = _find_duplicates(keys, files)
    memory_keys, error_ids = _existing_keys(store)
    logger.info("%d input records, %d ids used more than once; the store already holds %d memories and %d errors",
                inputs, len(duplicates), len(memory_keys), len(error_ids))

    existing_ref = ray.put((memory_keys, error_ids))
    prepared = parsed().map_batches(
        prepare, batch_format="pyarrow", num_cpus=cfg.cpus_per_prepare_task,  # its own CPU tasks, not fused into
        # the writer actors: tokenizing never holds a GPU actor
        fn_kwargs={"reader_uri": cfg.reader, "s3_endpoint": cfg.s3_endpoint, "spec": asdict(spec), "steps": steps,
                   "lr": lr, "chunk": cfg.chunk, "duplicates": duplicates, "existing_ref": existing_ref},
    )
    written = prepared.map_batches(
        MemoryWriter, batch_format="pyarrow", batch_size=cfg.batch_size * cfg.batches_per_call,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
        fn_constructor_kwargs={"reader_uri": cfg.reader, "s3_endpoint": cfg.s3_endpoint, "output": cfg.output,
                               "steps": steps, "lr": lr, "batch_size": cfg.batch_size,
                               "greedy_check": cfg.greedy_check, "compile": cfg.compile,
                               "threads": max(1, int(cfg.cpus_per_actor))},
    )
    todo = max(1, inputs - len(error_ids) - len({k[0] for k in memory_keys}))  # roughly what is left to do
    done = {"memories": 0, "errors": 0, "documents": 0, "tokens": 0, "padded_tokens": 0, "write_s": 0.0}
    run_start, last_log = time.time(), time.time()
    for summary in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in summary.to_pylist():
            for k in done:
                done[k] += row[k]
        now = time.time()
        if now - last_log >= cfg.progress_every_s:
            rate = done["documents"] / max(now - run_start, 1e-9)
            eta = max(0, todo - done["documents"]) / max(rate, 1e-9)
            logger.info("progress: %d/~%d records (%d memories, %d errors), %.1f records/s, ETA %.0f s",
                        done["documents"], todo, done["memories"], done["errors"], rate, eta)
            last_log = now
    write_pass = time.time() - run_start
    wall = time.time() - started
    counts = summarize(store, inputs)
    manifest = {
        "format_version": records.RECORD_FORMAT_VERSION, "reader_fingerprint": spec.fingerprint,
        "reader": cfg.reader, "input": cfg.input, "write_steps": steps, "write_lr": lr, "m": spec.num_memory,
        "d": spec.d_model, "chunked": cfg.chunk, **counts,
        "this_run": {**done, "wall_s": round(wall, 3), "write_pass_s": round(write_pass, 3), "padding": round(1 - done["tokens"] / done["padded_tokens"], 4)
                     if done["padded_tokens"] else 0.0},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_manifest(manifest)
    logger.info("done: %d inputs -> %d memories + %d errors (%s) in %.1f s; this run wrote %d memories and %d errors "
                "(%.1f records/s); complete=%s", inputs, counts["memories"], counts["errors"],
                counts["error_reasons"], wall, done["memories"], done["errors"],
                done["documents"] / max(write_pass, 1e-9), counts["complete"])
    return manifest
