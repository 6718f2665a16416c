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
  manifest's ``complete`` says that every input of this run is accounted for (``summarize``): its document's
  memories hold all chunks, or it has a current error row. Error rows superseded by a later success (``too_long``,
  then a rerun with ``--chunk``) are counted apart, and memories of other documents (online writes) are ignored.
- One record never stops a job: anything that fails while parsing or preparing one record (invalid JSON, a line
  nested too deeply, a lone surrogate, an id over ``records.MAX_ID_CHARS``, a type nobody foresaw) becomes its
  error row. Parquet inputs are read with pyarrow alone and their column types checked on the schema first:
  only plain string columns (and integer ids) are converted to Python; an extension type such as Ray's
  pickled objects is refused unread (``malformed``), so no input can run code. A bad element of a .json array
  or a Parquet value that is not UTF-8 costs its own record only. Inside an input directory no symbolic link is
  followed and only regular files are read; a link, a FIFO or a name that is not UTF-8 is one error row, unread
  (``list_inputs``, ``unread_rows``).
- The input is read, parsed, tokenized and content-addressed once: the prepared records are materialized (Ray
  spills them to disk when they outgrow the object store), the driver collects each record's (order, source,
  doc_id) from them, and duplicate ids are resolved before any WRITE: the first record in input order (files
  sorted by path, then line) wins, later ones become ``duplicate_id`` errors (a record that could not be read
  at all keeps its own reason). The rows left for the writers are materialized in turn (the prepared ones are
  then released) and counted: when there are none, as in a rerun of a finished job, no writer actor starts.
- Reruns and restarts: memories are keyed by (doc_id, chunk, memory_id) and errors by error_id; whatever the
  store already holds is skipped before it reaches a writer, and parts are immutable, named by their rows'
  identities and published without ever replacing a file (``gradmem.store``), so a run killed at any point and
  started again ends with every record exactly once; temporary files of killed runs are removed at the next run.
  A reader's first writes into a store share one write setting, and the store one chunking (checked on the
  parts, not only the manifest); another is refused, and so is another reader's store unless it is an upgrade
  (pipelines/maintain.py) or the store's served-reader pointer names this reader. Everything is counted over this
  reader's current memories (``gradmem.store.current_memories``): repaired revisions and other readers' memories
  never count twice.
- ``open_run`` and ``write_pass`` are the pipeline's two halves: pipelines/maintain.py runs them for a repair
  (``write_pass`` with a plan: only the planned chunks, as their next revision) and an upgrade.
- Chunking (``--chunk``): a document over the reader's ``max_context_tokens`` is split into ordered chunks of
  ``chunk_tokens`` tokens (default: that maximum), each repeating ``chunk_overlap`` tokens of the one before
  (``gradmem.chunking``); every chunk becomes a memory (doc_id, chunk, n_chunks), none is dropped, and the manifest
  counts a document complete only when all its chunks are stored. The chunking is recorded in every memories
  part's metadata and in the manifest (``chunk_tokens``, ``chunk_overlap``). Without ``--chunk`` the store's
  chunking is the reader's maximum with no overlap (longer documents are ``too_long``), so a later run with
  ``--chunk`` and no other chunk setting adds to the same store.

Not supported: two jobs writing the same output at once (the manifest would report the duplicates).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from gradmem import records
from gradmem.chunking import Chunking
from gradmem.config import declared
from gradmem.memory import WRITE_PRECISIONS, WriteSetting
from gradmem.reader import ReaderSpec
from gradmem.store import MemoryStore, current_memories, describe_readers
from pipelines.metrics import WriterMetrics
from pipelines.storage import local_dir, resolve

logger = logging.getLogger(__name__)

INPUT_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
EXCERPT_CHARS = 200
_LINE_BITS = 32  # order key = file index << 32 | record index within the file


@declared
class CompressConfig:
    """One compression run (frozen, validated on construction; jobs/compress.py's flags are its fields)."""

    reader: str = Field(description="reader directory (local or s3://)")
    input: str = Field(description="a file or a directory of .jsonl/.json/.parquet/.txt (local or s3://)")
    output: str = Field(description="the memory store root (local or s3://)")
    steps: int | None = Field(None, ge=0, description="WRITE steps K, the most an adaptive write takes (None: the "
                              "reader's own)")
    lr: float | None = Field(None, gt=0, description="WRITE step size alpha (None: the reader's own)")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="adaptive WRITE: stop each context once its "
                                          "reconstruction accuracy reaches this (None: the reader's own, by default "
                                          "a fixed K)")
    min_steps: int | None = Field(None, ge=0, description="adaptive WRITE: steps every context takes before the "
                                  "target is checked (None: the reader's own)")
    precision: Literal[WRITE_PRECISIONS] = Field("float32", description="the WRITE's arithmetic: bfloat16 runs it "
                                                 "under autocast (faster where bf16 matrix units exist: GPUs, recent "
                                                 "CPUs; part of the write setting and of each memory_id)")
    batch_size: int = Field(32, ge=1, description="contexts per WRITE batch")
    batches_per_call: int = Field(8, ge=1, description="WRITE batches per actor call: the pool a call sorts by "
                                  "length (bucketing)")
    actors: int = Field(1, ge=1, description="writer actors")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each writer actor reserves")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs each writer actor reserves")
    cpus_per_prepare_task: float = Field(0.5, gt=0, description="CPUs of each parse + tokenize task (cheap; a "
                                         "different request keeps them unfused)")
    chunk: bool = Field(False, description="split over-long documents into ordered chunks instead of rejecting them")
    chunk_tokens: int | None = Field(None, ge=1, description="with chunk: tokens per chunk, at most the reader's "
                                     "max_context_tokens (None: that maximum)")
    chunk_overlap: int = Field(0, ge=0, description="with chunk: tokens each chunk repeats from the end of the one "
                               "before it (fewer than the chunk size)")
    greedy_check: bool = Field(True, description="measure free-running reconstruction accuracy (one decoding step "
                               "per token)")
    compile: bool = Field(False, description="torch.compile each writer's backbone (pays off on large corpora)")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (None: AWS_ENDPOINT_URL)")
    progress_every_s: float = Field(10.0, gt=0, description="seconds between progress lines")

    @model_validator(mode="after")
    def _chunk_settings(self) -> "CompressConfig":
        if not self.chunk and (self.chunk_tokens is not None or self.chunk_overlap):
            raise ValueError("chunk_tokens and chunk_overlap say how documents are split: set chunk (--chunk) too")
        if self.chunk_tokens is not None:
            Chunking(tokens=self.chunk_tokens, overlap=self.chunk_overlap)  # the one check of a chunking
        return self

    def chunking(self, max_context_tokens: int) -> Chunking:
        """This run's chunking for a reader that accepts ``max_context_tokens``: ``chunk_tokens`` (default: that
        maximum) and ``chunk_overlap``; without ``chunk``, that maximum and no overlap (longer documents are
        ``too_long``). A ValueError when the chunking does not fit the reader."""
        tokens = max_context_tokens if self.chunk_tokens is None else self.chunk_tokens
        if tokens > max_context_tokens:
            raise ValueError(f"chunk_tokens {tokens} is over the reader's max_context_tokens ({max_context_tokens}): "
                             "a chunk must fit one WRITE")
        try:
            return Chunking(tokens=tokens, overlap=self.chunk_overlap)
        except ValueError as e:
            raise ValueError(f"chunk_overlap {self.chunk_overlap} with chunks of the reader's max_context_tokens "
                             f"({tokens}): {e}") from None


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFile:
    index: int
    path: str  # inside the filesystem
    kind: str  # jsonl | parquet | txt
    name: str  # relative to the input root: shown in sources, and the id of a .txt document
    refused: str | None = None  # why this entry is not read (it becomes one error row, unread)


# Entries of a local input directory that are never read, each one error row (``list_inputs``)
_LINK = "a symbolic link: not followed (a link could read files outside the input directory)"
_NOT_REGULAR = "not a regular file (a FIFO, socket or device is never read)"
_NOT_UTF8_NAME = "the file name is not valid UTF-8"
_CONTROL_NAME = ("the file name holds a control character (a newline, a tab, ...) that Ray's path handling does not "
                 "keep, so the file could not be opened: rename it")
_UNLISTABLE_NAME = "the store listed this object's name with U+FFFD: it lost characters the object's key holds"


def _odd_name(path: str, s3: bool) -> str | None:
    """Why an input name cannot be read through ``ray.data.read_binary_files`` (None: it can). Ray drops newlines
    and other control characters from the paths it is given (the file it then asks for does not exist, and the
    whole read fails), and an S3 store lists a key it cannot represent with U+FFFD (a key that does not exist)."""
    if any(unicodedata.category(ch) == "Cc" for ch in path):
        return _CONTROL_NAME
    if s3 and "\ufffd" in path:
        return _UNLISTABLE_NAME
    return None


def list_inputs(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, list[InputFile]]:
    """The input files in a stable order. Names starting with '.' or '_' (markers, temporaries) are skipped,
    and so, with a warning, are files of other types. Inside a local input directory, symbolic links are not
    followed and nothing but regular files is read: each such entry with an input suffix (and each linked
    directory) is listed ``refused``, as is a file whose name is not UTF-8 (the job's error rows say so). Local
    or on S3, a name that Ray could not open (``_odd_name``: control characters; U+FFFD in an S3 listing) is
    ``refused`` too: one error row, never a failed job. The input path itself is the operator's and is taken as
    given."""
    store = resolve(uri, s3_endpoint)
    info = store.filesystem.get_file_info(store.path)
    if info.type == pafs.FileType.File:
        entries, root = [(info.path, None, False)], str(PurePosixPath(store.path).parent)
    elif info.type == pafs.FileType.Directory and store.is_s3:
        entries = [(i.path, None, False) for i in store.filesystem.get_file_info(
            pafs.FileSelector(store.path, recursive=True)) if i.type == pafs.FileType.File]
        root = store.path
    elif info.type == pafs.FileType.Directory:
        entries, root = _local_entries(store.path), store.path
    else:
        raise FileNotFoundError(f"input {uri} does not exist")
    files = []
    for path, refused, linked_dir in sorted(entries, key=lambda e: e[0]):
        name = path[len(root):].lstrip("/")
        if any(part.startswith((".", "_")) for part in name.split("/")):
            continue
        kind = INPUT_SUFFIXES.get(PurePosixPath(path).suffix.lower())
        if kind is None and not linked_dir:
            logger.warning("skipping %s: not one of %s", records.safe_text(path), sorted(INPUT_SUFFIXES))
            continue
        refused = refused or _odd_name(path, store.is_s3)
        if refused is not None:
            logger.warning("not reading %s: %s", records.safe_text(path), refused)
        files.append(InputFile(len(files), path, kind or "refused", name, refused))
    if not files:
        raise FileNotFoundError(f"input {uri} holds no {'/'.join(sorted(INPUT_SUFFIXES))} files")
    return store.filesystem, files


def _local_entries(root: str) -> list[tuple[str, str | None, bool]]:
    """(path, why it is refused or None, whether it is a linked directory) of the entries under a local directory,
    walked without following symbolic links. Names are read as bytes, so one that is not UTF-8 is an entry too."""
    out = []
    for folder, dirs, names in os.walk(os.fsencode(root), followlinks=False):
        for name in dirs:  # a linked directory is listed by os.walk but never entered
            if os.path.islink(os.path.join(folder, name)):
                out.append((os.fsdecode(os.path.join(folder, name)), _LINK, True))
        for name in names:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            why = _LINK if stat.S_ISLNK(mode) else None if stat.S_ISREG(mode) else _NOT_REGULAR
            text = os.fsdecode(path)  # bytes that are not UTF-8 become lone surrogates (``_unencodable``)
            out.append((text, why or (_NOT_UTF8_NAME if _unencodable(text) else None), False))
    return out


_PARSED = pa.schema([
    ("order", pa.int64()), ("source", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
    ("reason", pa.string()), ("message", pa.string()), ("excerpt", pa.string()),
])


def _record(order: int, source: str, doc_id=None, text=None, reason=None, message=None, excerpt=None) -> dict:
    """One parsed row. Every string that quotes the input is made UTF-8-safe here (``records.safe_text``): an
    error row must itself be writable to Parquet."""
    return {"order": order, "source": records.safe_text(source), "doc_id": records.safe_text(doc_id), "text": text,
            "reason": reason, "message": records.safe_text(message),
            "excerpt": records.safe_text(excerpt[:EXCERPT_CHARS]) if excerpt else excerpt}


def _excerpt(raw: bytes) -> str:
    return raw[:EXCERPT_CHARS].decode("utf-8", "replace")


def _parse_json_value(order: int, source: str, raw: bytes) -> dict:
    """One JSON record (a jsonl line or an array element, as bytes): any failure is this record's error row."""
    excerpt = _excerpt(raw)
    try:
        row = json.loads(raw)
    except RecursionError:
        return _record(order, source, reason="malformed", message="not a JSON object: nested too deeply",
                       excerpt=excerpt)
    except (ValueError, UnicodeDecodeError) as e:
        return _record(order, source, reason="malformed", message=f"not a JSON object: {e}", excerpt=excerpt)
    return _checked(order, source, row, excerpt)


def _checked(order: int, source: str, row: Any, excerpt: str | None) -> dict:
    """``_check_row``, with any exception it raises on this record (a value nobody foresaw) as its error row."""
    try:
        return _check_row(order, source, row, excerpt)
    except Exception as e:  # noqa: BLE001 - one record never stops a job
        return _record(order, source, reason="malformed", message=f"cannot read this record: {type(e).__name__}",
                       excerpt=excerpt)


def _parse_jsonl(f: InputFile, data: bytes) -> list[dict]:
    """JSON lines; blank lines are skipped (not inputs), and keep the line numbering of the file. A ``.json``
    file holding one JSON array (pretty-printed or not) is read as that array's records. A UTF-8 byte-order mark
    (as some editors write) is not part of the first record."""
    data = data.removeprefix(_BOM)
    if f.kind == "json":
        array = _parse_json_array(f, data)
        if array is not None:
            return array
    out = []
    for n, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        out.append(_parse_json_value((f.index << _LINE_BITS) | n, f"{f.name}:{n + 1}", raw))
    return out


def _parse_json_array(f: InputFile, data: bytes) -> list[dict] | None:
    """The records of a ``.json`` file that is one JSON document: an array (source ``name[i]``) or one object,
    pretty-printed or not; None when it is not one document (then it is JSON lines). An array that does not parse
    as a whole (one element nested too deeply, an integer over Python's limit, a byte that is not UTF-8, a missing
    comma) is split into its elements, each its own record or error (``_array_elements``)."""
    first = data.lstrip()[:1]
    if first not in (b"[", b"{"):
        return None
    try:
        items = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        if first == b"[":
            return _parse_elements(f, data)
        return None  # not one JSON document: read it as JSON lines, each line its own record or error
    if isinstance(items, dict):
        return [_checked(f.index << _LINE_BITS, f"{f.name}:1", items, _excerpt(data))]
    if not isinstance(items, list):
        return None
    out = []
    for n, item in enumerate(items):
        order, source = (f.index << _LINE_BITS) | n, f"{f.name}[{n}]"
        try:
            excerpt = json.dumps(item, ensure_ascii=False)[:EXCERPT_CHARS] if not isinstance(item, dict) else None
        except (ValueError, RecursionError):
            excerpt = None
        out.append(_checked(order, source, item, excerpt))
    return out


_BOM = b"\xef\xbb\xbf"
# A JSON string (escapes included; the unrolled loop keeps the regex linear) or one structural character
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.S)


def _array_elements(data: bytes) -> tuple[list[bytes], bytes]:
    """The top-level elements of the JSON array that ``data`` opens with (after whitespace), as raw bytes, found
    by scanning strings and brackets only (nothing is decoded, so one bad element cannot hide the others), and
    what follows the array's end (all of the rest when it never closes). Empty elements (``[ ]``) are none."""
    start = data.index(b"[")
    depth, begin, elements, end = 0, start + 1, [], len(data)
    for m in _JSON_TOKEN.finditer(data, start):
        token = m.group()
        if token[:1] == b'"':
            continue
        if token in (b"[", b"{"):
            depth += 1
        elif token in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                elements.append(data[begin : m.start()])
                end = m.end()
                break
        elif depth == 1:  # a comma between two elements of the outer array
            elements.append(data[begin : m.start()])
            begin = m.end()
    else:
        elements.append(data[begin:])  # the array never closes: its last element runs to the end of the file
    return [e for e in elements if e.strip()], data[end:]


def _parse_elements(f: InputFile, data: bytes) -> list[dict]:
    """Each element of a JSON array that does not parse as a whole: its own record or error row (source
    ``name[i]``); anything after the array is one more error row."""
    elements, rest = _array_elements(data)
    out = [_parse_json_value((f.index << _LINE_BITS) | n, f"{f.name}[{n}]", raw) for n, raw in enumerate(elements)]
    if rest.strip():
        n = len(elements)
        out.append(_record((f.index << _LINE_BITS) | n, f"{f.name}[{n}]", reason="malformed",
                           message="data after the end of the JSON array", excerpt=_excerpt(rest.strip())))
    return out


def _unencodable(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _check_row(order: int, source: str, row: Any, excerpt: str | None) -> dict:
    """A parsed record -> a row to prepare, or its error row (reason ``malformed`` or ``not_text``)."""
    if not isinstance(row, dict):
        return _record(order, source, reason="malformed", message=f"a record must be an object, got {type(row).__name__}",
                       excerpt=excerpt)
    doc_id = row.get("id")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        return _record(order, source, reason="malformed", message=f"missing or invalid 'id' ({_short_repr(doc_id)}): "
                       "need a non-empty string or an integer", excerpt=excerpt)
    doc_id = str(doc_id)
    if _unencodable(doc_id):
        return _record(order, source, reason="malformed", message=f"'id' {doc_id!r} is not valid Unicode text "
                       "(a lone surrogate)", excerpt=excerpt)
    if len(doc_id) > records.MAX_ID_CHARS:
        return _record(order, source, reason="malformed", message=f"'id' of {len(doc_id)} characters: at most "
                       f"{records.MAX_ID_CHARS} (the query service's limit)", excerpt=excerpt or doc_id[:EXCERPT_CHARS])
    if "text" not in row:
        return _record(order, source, doc_id, reason="malformed", message="missing field 'text'", excerpt=excerpt)
    text = row["text"]
    if not isinstance(text, str):
        return _record(order, source, doc_id, reason="not_text", message=f"'text' is {type(text).__name__}, not a string",
                       excerpt=excerpt)
    if _unencodable(text):
        return _record(order, source, doc_id, reason="not_text", message="'text' is not valid Unicode text (a lone "
                       "surrogate)", excerpt=excerpt or text[:EXCERPT_CHARS])
    return _record(order, source, doc_id, text)


def _short_repr(value: Any) -> str:
    try:
        return repr(value)[:100]
    except RecursionError:
        return type(value).__name__


def _readable_type(t: pa.DataType, integers: bool) -> bool:
    """Plain Arrow strings (and integers for ids) only: an extension type (Ray's pickled objects, tensors) or any
    other type is refused by its schema, before a value is converted to Python."""
    if isinstance(t, pa.ExtensionType):
        return False
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or (
        integers and pa.types.is_integer(t))


def _parse_parquet(f: InputFile, data: bytes) -> list[dict]:
    """Rows of a Parquet file with ``id`` and ``text`` columns, read with pyarrow alone. Column types are checked on
    the Arrow schema first: a column of another type makes every row an error row, and its values are never
    converted to Python (Ray's pickled-object extension type would unpickle them, running the file's code)."""
    order0 = f.index << _LINE_BITS
    try:
        pfile = pq.ParquetFile(io.BytesIO(data))
        schema, n_rows = pfile.schema_arrow, pfile.metadata.num_rows
    except Exception as e:  # noqa: BLE001 - any unreadable file is one error row, never a crash
        return [_record(order0, f.name, reason="malformed", message=f"unreadable Parquet: {e}")]
    missing = {"id", "text"} - set(schema.names)
    if missing:
        return [_record(order0, f.name, reason="malformed", message=f"Parquet file lacks columns {sorted(missing)}")]
    refused = {c: schema.field(c).type for c in ("id", "text") if not _readable_type(schema.field(c).type, c == "id")}
    try:
        if refused:
            return _refused_rows(f, pfile, n_rows, refused)
        table = pfile.read(columns=["id", "text"])
    except Exception as e:  # noqa: BLE001
        return [_record(order0, f.name, reason="malformed", message=f"unreadable Parquet: {e}")]
    ids, texts = _decoded(table.column("id")), _decoded(table.column("text"))
    out = []
    for n, (doc_id, text) in enumerate(zip(ids, texts)):
        order, source = order0 | n, f"{f.name}#{n}"
        if isinstance(doc_id, _NotUtf8):
            out.append(_record(order, source, reason="malformed", message="'id' is not valid UTF-8",
                               excerpt=doc_id.excerpt))
        elif isinstance(text, _NotUtf8):
            out.append(_record(order, source, str(doc_id) if doc_id is not None else None, reason="not_text",
                               message="'text' is not valid UTF-8", excerpt=text.excerpt))
        else:
            row = {"id": doc_id, "text": text}
            excerpt = text[:EXCERPT_CHARS] if isinstance(text, str) else None
            out.append(_checked(order, source, row, excerpt))
    return out


@dataclass(frozen=True)
class _NotUtf8:
    """A Parquet string value whose bytes are not UTF-8 (pyarrow does not check them when it reads)."""

    excerpt: str


def _decoded(column: pa.ChunkedArray) -> list:
    """A column's Python values, each string decoded on its own: one value that is not UTF-8 is that row's
    ``_NotUtf8``, not an error for the whole file (``to_pylist`` of the string column would raise for all)."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_string_view(column.type)):
        return column.to_pylist()  # integer ids
    out = []
    for raw in column.cast(pa.large_binary()).to_pylist():
        if raw is None:
            out.append(None)
            continue
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(_NotUtf8(_excerpt(raw)))
    return out


def _refused_rows(f: InputFile, pfile: pq.ParquetFile, n_rows: int, refused: dict[str, pa.DataType]) -> list[dict]:
    """One ``malformed`` row per record of a file whose id or text column has a refused type (ids kept when their
    own column is readable)."""
    what = ", ".join(f"'{c}' has type {t}" for c, t in refused.items())
    message = f"{what}: only string columns are read (extension and object types are refused unread)"
    ids: list = [None] * n_rows
    if "id" not in refused:
        ids = [str(x) if isinstance(x, (str, int)) else None for x in _decoded(pfile.read(columns=["id"]).column("id"))]
    order0 = f.index << _LINE_BITS
    return [_record(order0 | n, f"{f.name}#{n}", ids[n] if ids[n] and not _unencodable(ids[n]) else None,
                    reason="malformed", message=message) for n in range(n_rows)]


def _parse_txt(f: InputFile, data: bytes) -> list[dict]:
    doc_id = f.name[: -len(".txt")] if f.name.lower().endswith(".txt") else f.name
    if len(doc_id) > records.MAX_ID_CHARS:
        return [_record(f.index << _LINE_BITS, f.name, reason="malformed", message=f"the file name gives an id of "
                        f"{len(doc_id)} characters: at most {records.MAX_ID_CHARS}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [_record(f.index << _LINE_BITS, f.name, doc_id, reason="not_text", message=f"not UTF-8 text: {e}",
                        excerpt=_excerpt(data))]
    return [_record(f.index << _LINE_BITS, f.name, doc_id, text)]


_PARSERS = {"jsonl": _parse_jsonl, "json": _parse_jsonl, "parquet": _parse_parquet, "txt": _parse_txt}


def parse(batch: pa.Table, files: dict[str, InputFile]) -> pa.Table:
    """File blocks (bytes, path) -> one row per input record (Ray Data task). A parser that fails on a file as
    a whole makes that file one error row; it never fails the job."""
    rows: list[dict] = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        f = files[path]
        try:
            rows.extend(_PARSERS[f.kind](f, data))
        except Exception as e:  # noqa: BLE001 - a parser bug or an input nobody foresaw: one error row, logged
            logger.exception("parsing %s failed", f.name)
            rows.append(_record(f.index << _LINE_BITS, f.name, reason="malformed",
                                message=f"could not parse the file: {type(e).__name__}: {e}"))
    return pa.Table.from_pylist(rows, schema=_PARSED)


def unread_rows(files: list[InputFile]) -> pa.Table:
    """One ``malformed`` row for each input entry that is never read (``InputFile.refused``), in ``parse``'s
    schema: the entry is accounted for like any unreadable file."""
    return pa.Table.from_pylist([_record(f.index << _LINE_BITS, f.name, reason="malformed", message=f.refused)
                                 for f in files if f.refused is not None], schema=_PARSED)


# ---------------------------------------------------------------------------------------------- prepare
# status: "write" (a chunk to WRITE), "error" (a new error row), "held" (the store already accounts for it: its
# memory, or the same error row); every input record has at least one row, so the driver sees every record.
_PREPARED = pa.schema([
    ("order", pa.int64()), ("source", pa.string()), ("doc_id", pa.string()), ("status", pa.string()),
    ("chunk", pa.int32()), ("n_chunks", pa.int32()), ("token_ids", pa.list_(pa.int32())), ("memory_id", pa.string()),
    ("reason", pa.string()), ("message", pa.string()), ("excerpt", pa.string()), ("revision", pa.int32()),
])
# "stale" (a repair only): the input's text is not the text the memory to repair was written from; left as it is
_UNREADABLE = ("malformed", "not_text")  # a duplicate id on a record that could not be read keeps this reason
_TOKENIZERS: dict[str, Any] = {}
_FETCHED: dict[str, Any] = {}


def _tokenizer(reader_uri: str, s3_endpoint: str | None):
    if reader_uri not in _TOKENIZERS:
        from transformers import AutoTokenizer

        path = local_dir(reader_uri, s3_endpoint, skip_suffixes=(".safetensors", ".bin"))
        _TOKENIZERS[reader_uri] = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return _TOKENIZERS[reader_uri]


_HELD: list = [None, {}]  # [the memory_keys set it was built from (kept alive: identity is safe), the map]


def _held_documents(memory_keys: set) -> dict[tuple[str, int], str]:
    """(doc_id, chunk) -> the memory_id the store holds for it, built once per store listing."""
    if _HELD[0] is not memory_keys:
        _HELD[:] = [memory_keys, {(d, c): m for d, c, m in memory_keys}]
    return _HELD[1]


def _existing(ref) -> tuple[set, set, dict[str, set[int]]]:
    """The (doc_id, chunk, memory_id) keys of this run's reader in the store, the store's error ids and, per
    doc_id of this reader, the chunk counts its memories record (``_existing_keys``), fetched once per worker
    process (an object ref, or the triple itself when called outside Ray)."""
    return _fetch(ref, tuple)


def _fetch(ref, kind: type):
    """A driver-side value shipped once per job (``ray.put``), fetched once per worker process and per ref; the
    value itself (of ``kind``) when called outside Ray."""
    if ref is None or isinstance(ref, kind):
        return ref
    import ray

    key = f"{kind.__name__}:{ref.hex()}"
    if key not in _FETCHED:
        for old in [k for k in _FETCHED if k.startswith(f"{kind.__name__}:")]:  # a previous job's
            del _FETCHED[old]
        _FETCHED[key] = ray.get(ref)
    return _FETCHED[key]


def _error_row(row: dict, reason: str, message: str, error_ids: set, **extra) -> dict:
    """An error row, or a ``held`` one when the store already has this very error."""
    held = records.error_id(row["source"], row["doc_id"], extra.get("chunk"), reason) in error_ids
    return {"order": row["order"], "source": row["source"], "doc_id": row["doc_id"], "reason": reason,
            "status": "held" if held else "error", "message": message,
            "excerpt": (row.get("excerpt") or (row.get("text") or "")[:EXCERPT_CHARS]), **extra}


def prepare(batch: pa.Table, reader_uri: str, s3_endpoint: str | None, spec: dict, setting: WriteSetting,
            chunk: bool, existing_ref, chunking: Chunking | None = None, plan_ref=None) -> pa.Table:
    """Validate, tokenize, chunk and content-address records, marking what the store already holds (Ray Data
    task). Duplicate ids need every record's id, so they are resolved after this, by ``resolve_duplicates``.
    ``chunking``: how ``chunk`` splits a document (None: chunks of the reader's maximum, no overlap).
    ``plan_ref``: a repair's plan (``RepairTarget`` per (doc_id, chunk)): only those chunks are written, as their
    next revision; every other chunk is held."""
    chunking = chunking or Chunking(tokens=spec["max_context_tokens"])
    tokenizer = _tokenizer(reader_uri, s3_endpoint)
    memory_keys, error_ids, chunk_counts = _existing(existing_ref)
    plan = _fetch(plan_ref, dict)
    out: list[dict] = []

    def error(row: dict, reason: str, message: str, **extra) -> None:
        out.append(_error_row(row, reason, message, error_ids, **extra))

    rows = batch.to_pylist()
    texts = [r["text"] if r["reason"] is None and r["text"].strip() else "" for r in rows]
    tokens, failures = _tokenize_each(tokenizer, texts)
    for i, (row, text, ids) in enumerate(zip(rows, texts, tokens)):
        if row["reason"] is not None:
            error(row, row["reason"], row["message"])
        elif i in failures:
            error(row, "not_text", f"the tokenizer refused this text: {failures[i]}")
        else:
            try:
                out.extend(_prepare_row(row, text, ids, error, spec, setting, chunk, chunking, memory_keys,
                                        error_ids, plan, chunk_counts))
            except Exception as e:  # noqa: BLE001 - one record never stops a job
                logger.exception("preparing %s failed", row["source"])
                error(row, "malformed", f"cannot prepare this record: {type(e).__name__}")
    return pa.Table.from_pylist(out, schema=_PREPARED)


def _prepare_row(row: dict, text: str, ids: list[int] | None, error, spec: dict, setting: WriteSetting, chunk: bool,
                 chunking: Chunking, memory_keys: set, error_ids: set, plan: dict | None = None,
                 chunk_counts: dict[str, set[int]] | None = None) -> list[dict]:
    """The chunks of one valid record, each to write or held (``error`` records why there are none). Without
    ``chunk`` a record fits one WRITE or is ``too_long``; with it, it is split by ``chunking`` (a record that
    fits one chunk is one chunk, as without ``chunk``)."""
    limit = spec["max_context_tokens"]
    if not text or not ids:
        error(row, "empty", records.ERROR_REASONS["empty"])
        return []
    if len(ids) > limit and not chunk:
        error(row, "too_long", f"{len(ids)} tokens, over the reader's maximum of {limit} (use --chunk to split)")
        return []
    pieces = chunking.split(ids) if chunk else [ids]
    mids = [records.memory_id(spec["fingerprint"], setting, piece) for piece in pieces]
    if plan is not None:
        return _repair_rows(row, text, pieces, mids, spec["fingerprint"], plan, memory_keys)
    counts = (chunk_counts or {}).get(row["doc_id"])
    if counts and counts != {len(pieces)}:  # another text under this id: its chunks must not mix with this one's
        error(row, "conflict", f"id {row['doc_id']!r} already holds a document of {'/'.join(map(str, sorted(counts)))} "
              f"chunk(s); this text makes {len(pieces)}")
        return []
    held_by = _held_documents(memory_keys)  # this reader's memories: another reader's never conflict
    other = [c for c, mid in enumerate(mids)  # a chunk held with this very memory (a repair may have
             if (row["doc_id"], c, mid) not in memory_keys  # superseded it since) is no conflict
             and held_by.get((row["doc_id"], c), mid) != mid]
    if other:  # the id holds other content (an online write, an earlier text): never replaced, never doubled
        error(row, "conflict", f"id {row['doc_id']!r} already holds another memory for chunk {other[0]} "
              f"({held_by[(row['doc_id'], other[0])]}); this text would be {mids[other[0]]}")
        return []
    out = []
    for c, (piece, mid) in enumerate(zip(pieces, mids)):
        held = ((row["doc_id"], c, mid) in memory_keys  # written before
                or records.error_id(row["source"], row["doc_id"], c, "non_finite") in error_ids)  # failed: not retried
        out.append({"order": row["order"], "source": row["source"], "doc_id": row["doc_id"], "chunk": c,
                    "n_chunks": len(pieces), "status": "held" if held else "write",
                    "token_ids": None if held else piece, "memory_id": mid,
                    "excerpt": text[:EXCERPT_CHARS] if c == 0 else None})  # for a duplicate_id row, if it is one
    return out


@dataclass(frozen=True)
class RepairTarget:
    """A memory a repair rewrites: its id, the write setting it was written with (to check that the input's
    text is the memory's own: the id is a content address) and its revision (the repair writes the next)."""

    memory_id: str
    setting: WriteSetting
    revision: int


def _repair_rows(row: dict, text: str, pieces: list[list[int]], mids: list[str], fingerprint: str, plan: dict,
                 memory_keys: set) -> list[dict]:
    """A repair's rows of one record: the planned chunks to write as their next revision (held when that memory
    is already stored: a rerun), ``stale`` when the text is no longer the one the memory was written from;
    every other chunk held."""
    out = []
    for c, (piece, mid) in enumerate(zip(pieces, mids)):
        weak: RepairTarget | None = plan.get((row["doc_id"], c))
        status = "held"
        if weak is not None:
            was = records.memory_id(fingerprint, weak.setting, piece)
            status = ("stale" if was != weak.memory_id else
                      "held" if (row["doc_id"], c, mid) in memory_keys else "write")
        out.append({"order": row["order"], "source": row["source"], "doc_id": row["doc_id"], "chunk": c,
                    "n_chunks": len(pieces), "status": status, "token_ids": piece if status == "write" else None,
                    "memory_id": mid if status == "write" else None,
                    "revision": weak.revision + 1 if weak is not None else None,
                    "excerpt": text[:EXCERPT_CHARS] if c == 0 else None})
    return out


def resolve_duplicates(batch: pa.Table, duplicates: dict[str, tuple[int, str]], existing_ref,
                       errors: bool = True) -> pa.Table:
    """Prepared rows -> what the writers do: the rows of a record whose id was first used by an earlier record
    become one ``duplicate_id`` error (an unreadable record keeps its own reason); held rows are dropped.
    ``errors`` False (a repair): error rows are dropped too, the compression run accounted for every input."""
    _, error_ids, _ = _existing(existing_ref)
    out: list[dict] = []
    for row in batch.to_pylist():
        first = duplicates.get(row["doc_id"]) if row["doc_id"] is not None else None
        if first is not None and first[0] != row["order"] and row["reason"] not in _UNREADABLE:
            if row["chunk"] in (None, 0):  # one error per record: a record's chunks may sit in several batches
                out.append(_error_row({**row, "chunk": None, "n_chunks": None}, "duplicate_id",
                                      f"id {row['doc_id']!r} was first used at {first[1]}", error_ids))
            continue
        out.append(row)
    keep = ("write", "error") if errors else ("write",)
    return pa.Table.from_pylist([r for r in out if r["status"] in keep], schema=_PREPARED)


def _tokenize_each(tokenizer, texts: list[str]) -> tuple[list[list[int] | None], dict[int, str]]:
    """Token ids per text (None for ""), in one batched call; if that fails, text by text, so that one text the
    tokenizer refuses becomes its own error (``failures``: position -> message) instead of failing the batch."""
    from gradmem.data import tokenize

    try:
        it = iter(tokenize(tokenizer, [t for t in texts if t]))
        return [next(it) if t else None for t in texts], {}
    except Exception:  # noqa: BLE001 - find the text(s) at fault below
        pass
    out: list[list[int] | None] = []
    failures: dict[int, str] = {}
    for i, text in enumerate(texts):
        try:
            out.append(tokenize(tokenizer, [text])[0] if text else None)
        except Exception as e:  # noqa: BLE001
            out.append(None)
            failures[i] = f"{type(e).__name__}: {records.safe_text(str(e))[:200]}"
    return out, failures


# ---------------------------------------------------------------------------------------------- writers
_SUMMARY = pa.schema([("memories", pa.int64()), ("errors", pa.int64()), ("documents", pa.int64()),
                      ("tokens", pa.int64()), ("padded_tokens", pa.int64()), ("write_s", pa.float64())])


class MemoryWriter:
    """A Ray Data actor: loads the reader once, WRITEs each call's contexts in length-sorted batches and
    writes that call's memory and error parts to the store before returning a one-row summary."""

    def __init__(self, reader_uri: str, s3_endpoint: str | None, output: str, fingerprint: str,
                 setting: WriteSetting, batch_size: int, greedy_check: bool, compile: bool, threads: int,
                 chunking: Chunking | None = None, gpus: float = 0.0):
        from gradmem import Reader
        from gradmem.runtime import configure_cpu, reserved_device

        configure_cpu(threads=threads)
        device = reserved_device(gpus)  # the GPU this actor reserved (gpus_per_actor), never one it merely sees
        self.reader = Reader.from_pretrained(local_dir(reader_uri, s3_endpoint), device=device)
        if self.reader.fingerprint != fingerprint:  # the memory ids were computed for that reader, upstream
            raise RuntimeError(f"the reader at {reader_uri} changed under the job: fingerprint "
                               f"{self.reader.fingerprint}, the job prepared its records for {fingerprint}")
        if compile:
            self.reader.compile()
        where = resolve(output, s3_endpoint)
        self.store = MemoryStore(where.filesystem, where.path)
        self.setting = setting  # the one the memory ids were computed for, upstream
        self.batch_size, self.greedy_check = batch_size, greedy_check
        self.chunking = chunking  # recorded in each memories part's metadata
        self.metrics = WriterMetrics()  # memories written, error rows by reason, write seconds, steps used

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
                memories = self.reader.write_tokens(ids, self.setting, self.batch_size)
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
                memory_ids=[r["memory_id"] for r in kept],  # computed once, upstream, for this reader and setting
                chunking=self.chunking,
                revisions=[r.get("revision") or 0 for r in kept],  # a repair's next revision; 0: a first write
            )
            self.store.write_part("memories", table)
        if errors:
            self.store.write_part("errors", records.error_table(errors, self.reader.fingerprint))
        steps_used = memories.steps_used[keep].tolist() if memories is not None and keep else []
        self.metrics.call(steps_used, [r["reason"] for r in errors], seconds if good else None)  # parts published
        padded = sum(len(b) * max(len(ids[i]) for i in b) for b in length_buckets(ids, self.batch_size))
        return pa.Table.from_pylist([{
            "memories": len(keep) if good else 0, "errors": len(errors), "documents": len(rows),
            "tokens": sum(len(x) for x in ids), "padded_tokens": padded, "write_s": seconds,
        }], schema=_SUMMARY)


# ---------------------------------------------------------------------------------------------- driver
def _check_output(store: MemoryStore, spec: ReaderSpec, setting: WriteSetting, chunking: Chunking | None = None,
                  mode: str = "compress") -> None:
    """One reader's first writes into a store share one write setting (K, alpha, the adaptive target and min
    steps, the precision): refuse to mix (memories could not be served together). An adaptive store's memories
    differ in ``steps_used``, never in the setting. The parts themselves are checked, not only the manifest: a
    first run killed before its manifest still binds. Parts and manifests written before adaptive writes and
    precisions existed hold fixed-K float32 writes (target None, min steps 0). And one chunking
    (``_check_chunking``; None: this run does not chunk), whatever the mode.

    ``mode``: "compress" also refuses memories of another reader, unless the store's served-reader pointer names
    this one (an upgraded store: the old reader's memories stay beside it); "upgrade" (another reader's memories
    are the point) and "repair" (a repair writes its own setting as later revisions) relax what they must.
    Repaired memories (revision > 0) never bind the setting."""
    mine = (spec.fingerprint, setting)
    served = store.served()
    prior = store.manifest()
    if mode == "compress" and prior is not None and (served is None or prior.get("reader_fingerprint") == mine[0]):
        _refuse_other(store, (prior.get("reader_fingerprint"), records.write_setting(prior)), mine)
    rows = store.read_memories(records.SETTING_COLUMNS)
    fingerprints = set(rows.column("fingerprint").to_pylist()) if rows is not None else set()
    if mode == "compress" and (served is None or served["fingerprint"] != spec.fingerprint):
        for fp in sorted(fingerprints - {spec.fingerprint}):
            raise ValueError(f"output {store.root} holds memories of reader {fp}, not of {spec.fingerprint}; "
                             "Use another --output (or jobs/maintain.py upgrade to add this reader's memories).")
    if rows is not None and mode != "repair":
        first = rows.filter(pc.and_(pc.equal(rows.column("fingerprint"), spec.fingerprint),
                                    pc.equal(rows.column("revision"), 0)))
        for theirs in sorted({records.write_setting(r) for r in first.to_pylist()}, key=str):
            _refuse_other(store, (spec.fingerprint, theirs), mine)
    _check_chunking(store, spec, chunking or Chunking(tokens=spec.max_context_tokens))  # None: unchunked


def _check_chunking(store: MemoryStore, spec: ReaderSpec, chunking: Chunking) -> None:
    """One store, one chunking: a chunk number names other text under another chunking, so a document chunked one
    way beside another chunked another way could not be read by one rule (checked on the parts, and the manifest)."""
    before = Chunking(tokens=spec.max_context_tokens)  # what parts written before chunkings were recorded hold
    for where, theirs in sorted(store.chunkings(before, spec.fingerprint).items()):
        if theirs != chunking:
            name = where.rsplit("/", 1)[-1]
            raise ValueError(f"output {store.root} holds memories chunked at {theirs} ({name}); this run would chunk "
                             f"at {chunking}. Rerun with --chunk-tokens {theirs.tokens} --chunk-overlap "
                             f"{theirs.overlap}, or use another --output.")


def _refuse_other(store: MemoryStore, theirs: tuple[str, WriteSetting], mine: tuple[str, WriteSetting]) -> None:
    """Refuse (reader fingerprint, setting) ``mine`` in a store holding ``theirs``, naming both."""
    if theirs != mine:
        raise ValueError(f"output {store.root} holds memories of reader {theirs[0]} written with "
                         f"{theirs[1].describe()}; this run uses reader {mine[0]} with {mine[1].describe()}. "
                         "Use another --output.")


def _existing_keys(store: MemoryStore, fingerprint: str) -> tuple[set, set, dict[str, set[int]]]:
    """The (doc_id, chunk, memory_id) of every memory of this reader (another reader's never conflict and never
    stand in for one of this reader), every error id, and per doc_id the chunk counts (n_chunks) its memories
    record: a text that chunks differently is another text, whatever chunks it shares (``_prepare_row``)."""
    mem = _memories_of(store, fingerprint, ["doc_id", "chunk", "memory_id", "n_chunks"])
    err = store.read("errors", ["error_id"])
    memory_keys = set(zip(*(mem.column(c).to_pylist() for c in ("doc_id", "chunk", "memory_id")))) if mem else set()
    chunk_counts: dict[str, set[int]] = {}
    for doc_id, n in zip(*(mem.column(c).to_pylist() for c in ("doc_id", "n_chunks"))) if mem else ():
        chunk_counts.setdefault(doc_id, set()).add(n)
    return memory_keys, set(err.column("error_id").to_pylist()) if err else set(), chunk_counts


def _memories_of(store: MemoryStore, fingerprint: str, columns: list[str]) -> pa.Table | None:
    """``columns`` (plus fingerprint and revision) of one reader's memories; None when it has none."""
    table = store.read_memories(columns)
    if table is None:
        return None
    table = table.filter(pc.equal(table.column("fingerprint"), fingerprint))
    return table if table.num_rows else None


def _collect_keys(keys) -> pa.Table:
    """The (order, source, doc_id) of every input record, one row each, in the driver (a few short strings a
    record; a chunked record's rows share its order)."""
    import ray

    tables = [t for t in ray.get(keys.to_arrow_refs()) if t.num_rows]
    if not tables:
        return _PARSED.empty_table().select(["order", "source", "doc_id"])
    rows = pa.concat_tables(tables)
    unique = rows.group_by(["order", "source"], use_threads=False).aggregate([("doc_id", "first")])
    return unique.rename_columns(["order", "source", "doc_id"]).sort_by("order")


def _find_duplicates(inputs: pa.Table) -> dict[str, tuple[int, str]]:
    """doc_id -> (order, source) of its first record, for ids used more than once."""
    with_id = inputs.filter(pc.is_valid(inputs.column("doc_id")))
    if with_id.num_rows == 0:
        return {}
    groups = with_id.group_by("doc_id").aggregate([("order", "min"), ("order", "count")])
    dupes = groups.filter(pc.greater(groups.column("order_count"), 1))
    if dupes.num_rows == 0:
        return {}
    firsts = set(dupes.column("order_min").to_pylist())
    source_of = {o: s for o, s in zip(inputs.column("order").to_pylist(), inputs.column("source").to_pylist())
                 if o in firsts}
    return {d: (o, source_of[o]) for d, o in zip(dupes.column("doc_id").to_pylist(), dupes.column("order_min").to_pylist())}


def _complete_documents(mem: pa.Table | None) -> set[str]:
    """doc_ids whose memories hold every chunk (0..n_chunks-1)."""
    if mem is None:
        return set()
    chunks: dict[str, set[int]] = {}
    wanted: dict[str, int] = {}
    for doc_id, chunk, n in zip(*(mem.column(c).to_pylist() for c in ("doc_id", "chunk", "n_chunks"))):
        chunks.setdefault(doc_id, set()).add(chunk)
        wanted[doc_id] = max(wanted.get(doc_id, 0), n)
    return {d for d, have in chunks.items() if have >= set(range(wanted[d]))}


def summarize(store: MemoryStore, inputs: pa.Table, fingerprint: str | None = None) -> dict[str, Any]:
    """Counts over the store's current memories of reader ``fingerprint`` (the run's; None: the store's one
    reader; a repaired memory counts once, in place of the one it replaced; another reader's are not counted) and
    whether every input of this run is accounted for.

    Complete means: every input record (``inputs``: order, source, doc_id) either is the first record of a
    doc_id whose memories hold all its chunks, or has a current error row (matched by its source); and no
    (doc_id, chunk) holds two current memories of this reader. An error row is superseded (ignored, counted apart)
    when its document has since been written in full (e.g. ``too_long``, then a rerun with ``--chunk``) or when
    its source is now accounted for by memories. Memories of documents that are not among the inputs (online writes, other
    corpora) neither complete nor break a run."""
    if fingerprint is None:
        readers = sorted(set(store.fingerprints("memories").values()))
        if len(readers) > 1:
            raise ValueError(f"the store holds memories of {len(readers)} readers: say whose to count")
        fingerprint = readers[0] if readers else ""
    mem, duplicates = current_memories(_memories_of(store, fingerprint, ["doc_id", "chunk", "n_chunks", "memory_id"]))
    err = store.read("errors", ["doc_id", "chunk", "n_chunks", "reason", "source"])
    complete_docs = _complete_documents(mem)
    first: dict[str, int] = {}
    for order, doc_id in zip(inputs.column("order").to_pylist(), inputs.column("doc_id").to_pylist()):
        if doc_id is not None and (doc_id not in first or order < first[doc_id]):
            first[doc_id] = order
    by_memory = {s for o, s, d in zip(*(inputs.column(c).to_pylist() for c in ("order", "source", "doc_id")))
                 if d in complete_docs and first.get(d) == o}
    current, superseded = _current_errors(err, complete_docs, by_memory)
    error_sources = {r["source"] for r in current}
    missing = [s for s in inputs.column("source").to_pylist() if s not in by_memory and s not in error_sources]
    reasons: dict[str, int] = {}
    for r in current:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    chunked = {}
    for rows in (mem.select(["doc_id", "n_chunks"]).to_pylist() if mem is not None else [], current):
        for r in rows:
            if r["n_chunks"] is not None and r["n_chunks"] > 1:
                chunked[r["doc_id"]] = r["n_chunks"]
    input_ids = set(first)
    n_mem = mem.num_rows if mem is not None else 0
    other = sum(1 for d in mem.column("doc_id").to_pylist() if d not in input_ids) if mem is not None else 0
    if missing:
        logger.warning("%d inputs have neither memories nor a current error row, e.g. %s", len(missing), missing[:5])
    return {"inputs": inputs.num_rows, "memories": n_mem, "errors": len(current), "extra_chunks":
            sum(n - 1 for n in chunked.values()), "error_reasons": reasons, "duplicates": duplicates,
            "superseded_errors": superseded, "other_memories": other, "missing": len(missing),
            "skipped_parts": store.skipped_counts(), "complete": not missing and duplicates == 0}


def _current_errors(err: pa.Table | None, complete_docs: set[str], by_memory: set[str]) -> tuple[list[dict], int]:
    """Error rows still in force, and how many are superseded by memories written since. A ``conflict`` is never
    superseded: its document's memories are complete by definition (another content holds the id), and the user must
    see that this input's text was not written."""
    if err is None:
        return [], 0
    current, superseded = [], 0
    for r in err.to_pylist():
        if r["reason"] == "conflict":
            current.append(r)
        elif r["source"] in by_memory or (r["reason"] != "duplicate_id" and r["doc_id"] in complete_docs):
            superseded += 1
        else:
            current.append(r)
    return current, superseded


@dataclass(frozen=True)
class Run:
    """A write pass over a store (a compression, a repair or an upgrade), resolved once in the driver: the
    reader, the write setting every memory of the pass gets, and the store."""

    cfg: CompressConfig
    spec: ReaderSpec
    setting: WriteSetting
    store: MemoryStore
    chunking: Chunking  # how --chunk splits a document (recorded in parts and the manifest)


@dataclass
class Pass:
    """What a write pass saw and did: every input record's (order, source, doc_id), the writers' summed
    summaries (``_SUMMARY``), the seconds of the write, and a repair's stale chunks."""

    inputs: pa.Table
    done: dict[str, float]
    seconds: float
    stale: list[tuple[str, int]]


def open_run(cfg: CompressConfig, mode: str = "compress") -> Run:
    """Resolve the reader and the write setting, clean what killed runs left and check that this pass may write
    into the store (``_check_output``; ``mode``: compress, repair or upgrade)."""
    spec = ReaderSpec.from_dir(local_dir(cfg.reader, cfg.s3_endpoint))
    # checked before any record is prepared; None takes the reader's own
    setting = WriteSetting.resolve(spec, cfg.steps, cfg.lr, cfg.target_accuracy, cfg.min_steps, cfg.precision)
    chunking = cfg.chunking(spec.max_context_tokens)
    target = resolve(cfg.output, cfg.s3_endpoint)
    store = MemoryStore(target.filesystem, target.path)
    store.check_writable_layout()  # a file where the store or a part folder goes: refused before any work
    store.clean_temporaries()  # what killed runs left behind
    _check_output(store, spec, setting, chunking, mode)
    return Run(cfg, spec, setting, store, chunking)


def write_pass(run: Run, plan: dict[tuple[str, int], RepairTarget] | None = None) -> Pass:
    """Read, prepare and write the input on the connected Ray cluster: everything the store lacks for this reader
    and setting (``plan`` None), or a repair's planned chunks only (no error rows: the compression run accounted
    for every input)."""
    import ray
    import ray.data

    cfg, spec, store = run.cfg, run.spec, run.store
    fs, files = list_inputs(cfg.input, cfg.s3_endpoint)
    readable = [f for f in files if f.refused is None]
    by_path = {f.path: f for f in readable}
    logger.info("%s %d files from %s with reader %s (%s, %s) into %s", "compressing" if plan is None else
                f"repairing {len(plan)} memories from", len(files), cfg.input, spec.fingerprint, run.setting.describe(),
                f"chunks of {run.chunking}" if cfg.chunk else "no chunking", cfg.output)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver logs documents/s and ETA instead

    memory_keys, error_ids, chunk_counts = _existing_keys(store, spec.fingerprint)
    existing_ref = ray.put((memory_keys, error_ids, chunk_counts))
    plan_ref = ray.put(plan) if plan is not None else None
    parsed = None
    if readable:
        raw = ray.data.read_binary_files([f.path for f in readable], filesystem=fs, include_paths=True,
                                         override_num_blocks=len(readable))
        parsed = raw.map_batches(parse, fn_kwargs={"files": by_path}, batch_size=1, batch_format="pyarrow")
    if len(readable) < len(files):  # entries never read (links, FIFOs, names not UTF-8): one error row each
        unread = ray.data.from_arrow(unread_rows(files))
        parsed = parsed.union(unread) if parsed is not None else unread
    prepared = parsed.map_batches(
        prepare, batch_format="pyarrow", num_cpus=cfg.cpus_per_prepare_task,  # its own CPU tasks, not fused into
        # the writer actors: tokenizing never holds a GPU actor
        fn_kwargs={"reader_uri": cfg.reader, "s3_endpoint": cfg.s3_endpoint, "spec": asdict(spec),
                   "setting": run.setting, "chunk": cfg.chunk, "existing_ref": existing_ref, "chunking": run.chunking,
                   "plan_ref": plan_ref},
    ).materialize()  # the input is read and tokenized once; duplicate ids need every record's id before a WRITE
    input_keys = _collect_keys(prepared.select_columns(["order", "source", "doc_id"]))
    stale = _stale_chunks(prepared) if plan is not None else []
    inputs = input_keys.num_rows
    duplicates = _find_duplicates(input_keys)
    logger.info("%d input records, %d ids used more than once; the store already holds %d memories of this reader "
                "and %d errors", inputs, len(duplicates), len(memory_keys), len(error_ids))
    to_write = prepared.map_batches(resolve_duplicates, batch_format="pyarrow", num_cpus=cfg.cpus_per_prepare_task,
                                    fn_kwargs={"duplicates": duplicates, "existing_ref": existing_ref,
                                               "errors": plan is None}).materialize()
    del prepared  # to_write holds all the writers need: the object store may free the prepared blocks
    done = {"memories": 0, "errors": 0, "documents": 0, "tokens": 0, "padded_tokens": 0, "write_s": 0.0}
    run_start = time.time()
    if to_write.count() == 0:  # a rerun of a finished job: no writer actor (no reader load, no GPU) is started
        logger.info("nothing to write: the store holds every memory and error of this input")
        return Pass(input_keys, done, 0.0, stale)
    written = to_write.map_batches(
        MemoryWriter, batch_format="pyarrow", batch_size=cfg.batch_size * cfg.batches_per_call,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
        fn_constructor_kwargs={"reader_uri": cfg.reader, "s3_endpoint": cfg.s3_endpoint, "output": cfg.output,
                               "fingerprint": spec.fingerprint, "setting": run.setting, "batch_size": cfg.batch_size,
                               "greedy_check": cfg.greedy_check, "compile": cfg.compile,
                               "threads": max(1, int(cfg.cpus_per_actor)), "chunking": run.chunking,
                               "gpus": cfg.gpus_per_actor},
    )
    todo = len(plan) if plan is not None else max(1, inputs - len(error_ids) - len({k[0] for k in memory_keys}))
    last_log = time.time()
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
    return Pass(input_keys, done, time.time() - run_start, stale)


def _stale_chunks(prepared) -> list[tuple[str, int]]:
    """(doc_id, chunk) of a repair's ``stale`` rows: memories left as they are because the input's text changed."""
    import ray

    tables = [t for t in ray.get(prepared.select_columns(["doc_id", "chunk", "status"]).to_arrow_refs()) if t.num_rows]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    return sorted((r["doc_id"], r["chunk"]) for r in rows if r["status"] == "stale")


def this_run(done: dict[str, float], seconds: float, started: float) -> dict[str, Any]:
    """The manifest's account of one pass: what the writers did, wall and write seconds, padding."""
    return {**done, "wall_s": round(time.time() - started, 3), "write_pass_s": round(seconds, 3),
            "padding": round(1 - done["tokens"] / done["padded_tokens"], 4) if done["padded_tokens"] else 0.0}


def compress(cfg: CompressConfig, mode: str = "compress") -> dict[str, Any]:
    """Run the pipeline on the connected Ray cluster; returns (and writes) the manifest. ``mode`` "upgrade": the
    store may hold other readers' memories (pipelines/maintain.py); the pipeline is the same."""
    started = time.time()
    run = open_run(cfg, mode)
    store, spec = run.store, run.spec
    done = write_pass(run)
    counts = summarize(store, done.inputs, spec.fingerprint)
    manifest = {
        "format_version": records.RECORD_FORMAT_VERSION, "reader_fingerprint": spec.fingerprint,
        "reader": cfg.reader, "input": cfg.input, **records.setting_columns(run.setting), "m": spec.num_memory,
        "d": spec.d_model, "chunked": cfg.chunk, **run.chunking.describe(), **counts,
        "this_run": this_run(done.done, done.seconds, started),
        "readers": describe_readers(store), "served": store.served(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if (prior := store.manifest()) is not None and "last_repair" in prior:
        manifest["last_repair"] = prior["last_repair"]
    store.write_manifest(manifest)
    logger.info("done: %d inputs -> %d memories + %d errors (%s) in %.1f s; this run wrote %d memories and %d errors "
                "(%.1f records/s); complete=%s", counts["inputs"], counts["memories"], counts["errors"],
                counts["error_reasons"], manifest["this_run"]["wall_s"], done.done["memories"], done.done["errors"],
                done.done["documents"] / max(done.seconds, 1e-9), counts["complete"])
    return manifest
