"""The memory store: a directory of Parquet parts that batch jobs and the service append to, and services read.

    ROOT/memories/part-<hash>.parquet   memory records (gradmem.records.schema)
    ROOT/errors/part-<hash>.parquet     inputs that did not become memories (gradmem.records.error_schema)
    ROOT/manifest.json                  the last batch run's counts, reader fingerprint and write settings, and
                                        which readers and settings the store holds (``describe_readers``)
    ROOT/served.json                    the served-reader pointer: {"reader", "fingerprint", "switched_at"},
                                        written by the upgrade job once the new reader's set is complete; the
                                        service serves that reader (absent: the service's own --reader)

Several readers and write settings (reader upgrades, repairs)
- Every part names its reader (schema metadata); a store may hold memories of several readers. Each reader has
  at most one *current* memory per (doc_id, chunk): the one of the highest ``revision`` (a repair writes the next
  revision from the same text; ``current_memories`` and ``MemoryIndex`` apply this one rule). A repaired memory
  is one new immutable part, so the moment it is visible it is current and the one it replaces is not: a reader
  never sees the document without a memory, or with two current ones.

ROOT is any pyarrow filesystem location (a local directory, an S3 bucket/prefix).

Naming and publication (why no write can delete another document)
- A part is named by a hash of the *identity* of its rows (``part_name``): for memories every row's
  (doc_id, chunk, memory_id), for errors every error_id (itself a hash of source, doc_id, chunk, reason). A
  retried task writing the same rows lands on the same name instead of duplicating them, while two documents
  with the same text (same memory_id, other doc_id) land on different names.
- Publishing never replaces an existing file (``_publish``): locally the complete part is written under a
  hidden temporary name and hard-linked to its final name, which fails if the name exists; on S3 the whole
  part is serialized in memory, uploaded under a hidden temporary key, checked to hold every byte and only then
  copied to its name (after checking that the name is free): a failed upload never publishes a truncated part
  (``_put``; SeaweedFS is not relied on for conditional puts). If the name is taken, the existing part is
  kept when it holds the same row identities (a retry); if it holds anything else (a foreign or corrupt file,
  or a hash collision) it is left alone and the part goes to the next of a few numbered alternative names.
  On S3 two writers racing for one name between the check and the put write rows of the same identity, so the
  object that wins holds the same documents either way.

Duplicate texts: a memory_id is a content address (reader, write settings, tokens), so two documents with the
same text share a memory_id, but each doc_id keeps its own row (and usually its own part): both are answerable,
and ``MemoryIndex.entry(doc_id=...)`` returns the row of the doc_id asked for. A query by memory_id alone
names the first doc_id indexed with that memory (all its doc_ids hold the same memory).

Reading is defensive: a ``part-*.parquet`` that is not a readable part of its kind (garbage, a foreign file, a
truncated copy) is skipped with a logged warning and counted in ``skipped`` (reported in the manifest and the
index stats), so one bad file never stops a consumer. Files written by older versions (parts named by a hash
of their memory_ids only) are read as before.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import time
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradmem.atomic import TMP_PREFIX, write_atomic  # one temporary-name prefix: clean_temporaries finds both
from gradmem.chunking import Chunking, recorded
from gradmem.config import json_object

logger = logging.getLogger(__name__)

KINDS = ("memories", "errors")
_KEY_COLUMNS = {"memories": ("doc_id", "chunk", "memory_id"), "errors": ("error_id",)}
_REQUIRED = {  # what a part of each kind must hold to be read at all
    "memories": {"memory_id", "doc_id", "chunk", "n_chunks", "memory", "write_steps", "write_lr", "recon_accuracy",
                 "n_context_tokens"},
    "errors": {"error_id", "doc_id", "chunk", "n_chunks", "source", "reason"},
}
# The Arrow type each column of a part must have when present (a hand-made part with a list of doc ids or a text
# chunk number would break every reader of the store, the service's index included): the part is skipped instead
_STRING, _INTEGER, _FLOAT = pa.types.is_string, pa.types.is_integer, pa.types.is_floating
_COLUMN_TYPES = {
    "memories": {"memory_id": _STRING, "doc_id": _STRING, "chunk": _INTEGER, "n_chunks": _INTEGER,
                 "write_steps": _INTEGER, "write_lr": _FLOAT, "write_target": _FLOAT, "write_min_steps": _INTEGER,
                 "write_precision": _STRING, "steps_used": _INTEGER, "recon_accuracy": _FLOAT, "recon_greedy": _FLOAT,
                 "n_context_tokens": _INTEGER, "write_time_s": _FLOAT, "revision": _INTEGER},
    "errors": {"error_id": _STRING, "doc_id": _STRING, "chunk": _INTEGER, "n_chunks": _INTEGER, "source": _STRING,
               "reason": _STRING, "message": _STRING, "excerpt": _STRING},
}
_ALTERNATIVES = 8  # names tried for one part when its own name is taken by a foreign file
# How long a publish whose server-side copy got no answer waits for the object to show up whole. The AWS SDK gives
# up on a request after 3 s without a byte on Linux (pyarrow's request_timeout is ignored there), and an
# S3-compatible server under load may say nothing while it copies a part of tens of MB, then finish the copy.
COPY_SETTLE_S = 30.0
MANIFEST, SERVED = "manifest.json", "served.json"
TMP_GRACE_S = 15 * 60  # a temporary file older than this belongs to a writer that died (parts take seconds)


def row_keys(kind: str, table: pa.Table) -> list[tuple]:
    """The identity of each row: (doc_id, chunk, memory_id) for memories, (error_id,) for errors."""
    return list(zip(*(table.column(c).to_pylist() for c in _KEY_COLUMNS[kind])))


def part_name(kind: str, table: pa.Table) -> str:
    """``part-<hash>.parquet`` over the sorted identities of the rows: the same rows, the same name; another
    document (even one with the same text, hence the same memory_id) another name."""
    keys = sorted(json.dumps(list(k)) for k in row_keys(kind, table))
    digest = hashlib.sha256(f"{kind}\n".encode() + "\n".join(keys).encode()).hexdigest()[:32]
    return f"part-{digest}.parquet"


class MemoryStore:
    def __init__(self, filesystem: pafs.FileSystem, root: str):
        self.fs = filesystem
        self.root = root.rstrip("/")
        self._checked: dict[str, str | None] = {}  # part path -> why it is skipped (None: readable); parts are immutable
        self.skipped: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self._fingerprints: dict[str, str] = {}  # readable part path -> reader fingerprint in its metadata
        self._metadata: dict[str, dict[str, str]] = {}  # readable part path -> its gradmem.* schema metadata

    def _dir(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown part kind {kind!r}; choose one of {KINDS}")
        return f"{self.root}/{kind}"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    # ------------------------------------------------------------------ writing
    def write_part(self, kind: str, table: pa.Table) -> str | None:
        """Write ``table`` as one immutable part; returns its path (None for an empty table). Never replaces
        another file: see the module docstring."""
        if table.num_rows == 0:
            return None
        missing = set(_KEY_COLUMNS[kind]) - set(table.column_names)
        if missing:
            raise ValueError(f"a {kind} part needs columns {sorted(missing)}")
        directory = self._dir(kind)
        path = f"{directory}/{part_name(kind, table)}"
        sink = io.BytesIO()  # serialized whole before anything is published: an error here publishes nothing
        pq.write_table(table, sink, compression="zstd")
        body = sink.getvalue()
        self.fs.create_dir(directory, recursive=True)
        for attempt in range(_ALTERNATIVES):  # the name, then deterministic alternatives: retries converge
            candidate = path if attempt == 0 else f"{path[: -len('.parquet')]}-{attempt}.parquet"
            if self._publish(candidate, body) or self._same_rows(kind, candidate, table):
                return candidate  # published, or a retry of the same rows: keep what is there
            logger.warning("%s is taken by other content; it is left alone", candidate)
        raise FileExistsError(f"{path} and its {_ALTERNATIVES - 1} alternatives are taken by other content")

    def _same_rows(self, kind: str, path: str, table: pa.Table) -> bool:
        try:
            existing = pq.read_table(path, filesystem=self.fs, columns=list(_KEY_COLUMNS[kind]))
        except Exception:  # noqa: BLE001 - an unreadable file is not the same rows
            return False
        return sorted(map(repr, row_keys(kind, existing))) == sorted(map(repr, row_keys(kind, table)))

    def _publish(self, path: str, body: bytes) -> bool:
        """Create ``path`` holding ``body`` unless it exists; True when published, False when the name was taken."""
        if self.is_local:
            return self._publish_local(path, body)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        self._put(path, body)
        return True

    def _publish_local(self, path: str, body: bytes) -> bool:
        directory, name = path.rsplit("/", 1)
        tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"  # hidden: no reader lists it
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, and fails if the name exists: never replaces a file
            except FileExistsError:
                return False
            except OSError as e:  # a filesystem without hard links: check, then rename (a narrow race)
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if os.path.exists(path):
                    return False
                os.rename(tmp, path)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _put(self, path: str, body: bytes) -> None:
        """One object, complete or not at all. pyarrow's S3 stream completes its upload on close() and even when
        dropped after an error (it has no abort), so the body goes to a hidden temporary key first; only when
        that object holds every byte is it copied to ``path`` (a server-side copy: the object appears whole)."""
        directory, name = path.rsplit("/", 1)
        tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            stream = self.fs.open_output_stream(tmp)
            try:
                stream.write(body)
            finally:
                stream.close()
            size = self.fs.get_file_info(tmp).size
            if size != len(body):
                raise OSError(f"upload of {path} incomplete: {size} of {len(body)} bytes arrived")
            try:
                self.fs.move(tmp, path)
            except OSError as e:
                if not self._arrived(path, len(body)):
                    raise
                logger.warning("the copy to %s outlasted its request (%s) but arrived whole", path, e)
                self.fs.delete_file(tmp)  # the move's own delete never ran
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)  # what a failed upload left; clean_temporaries catches a killed one's
            raise

    def _arrived(self, path: str, size: int) -> bool:
        """Whether ``path`` holds ``size`` bytes within COPY_SETTLE_S (the copy it names may still be running)."""
        deadline = time.monotonic() + COPY_SETTLE_S
        while True:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.File and info.size == size:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """The manifest is replaced as a whole (rename locally, one put on S3)."""
        self._replace_json(MANIFEST, manifest)

    def write_served(self, reader: str, fingerprint: str) -> None:
        """Point the service at ``reader`` (its location and fingerprint), replacing the pointer as a whole: a
        service reading it sees the old reader or the new, never half a pointer."""
        self._replace_json(SERVED, {"reader": reader, "fingerprint": fingerprint,
                                    "switched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _replace_json(self, name: str, value: dict[str, Any]) -> None:
        """The store's only mutable files (``MANIFEST``, ``SERVED``) are replaced whole: a rename locally, one
        put (upload, check, server-side copy) on S3."""
        body = json.dumps(value, indent=2, sort_keys=True).encode()
        self.fs.create_dir(self.root, recursive=True)
        path = f"{self.root}/{name}"
        if not self.is_local:
            self._put(path, body)
            return
        write_atomic(path, body)

    def check_writable_layout(self) -> None:
        """A clear ValueError, before any work, when the store's root or one of its part folders (``KINDS``) is a
        file: every part write would fail there, after the WRITEs that produced it had been paid for."""
        for directory in (self.root, *(self._dir(k) for k in KINDS)):
            if self.fs.get_file_info(directory).type == pafs.FileType.File:
                raise ValueError(f"{directory} is a file, not a folder of a memory store: nothing could be written "
                                 "there (use another output, or move the file away)")

    def clean_temporaries(self, grace_s: float = TMP_GRACE_S) -> int:
        """Delete temporary files older than ``grace_s`` that killed writers left (a live writer's are younger:
        a part takes seconds). Returns how many were deleted."""
        removed = 0
        cutoff = time.time() - grace_s
        for directory in (self.root, *(self._dir(k) for k in KINDS)):
            if self.fs.get_file_info(directory).type != pafs.FileType.Directory:
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(directory, recursive=False)):
                if not (info.base_name.startswith(TMP_PREFIX) and info.type == pafs.FileType.File):
                    continue
                if info.mtime is not None and info.mtime.timestamp() > cutoff:
                    continue
                try:
                    self.fs.delete_file(info.path)
                    removed += 1
                except FileNotFoundError:  # its writer finished, or another cleaner was first
                    continue
        if removed:
            logger.info("removed %d temporary files left by killed writers under %s", removed, self.root)
        return removed

    # ------------------------------------------------------------------ reading
    def parts(self, kind: str) -> list[str]:
        """Every ``part-*.parquet`` of ``kind``, readable or not (``valid_parts`` filters)."""
        directory = self._dir(kind)
        if self.fs.get_file_info(directory).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(directory, recursive=False))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("part-")
                      and i.base_name.endswith(".parquet"))

    def valid_parts(self, kind: str) -> list[str]:
        """The parts of ``kind`` that are readable parts of that kind; the others are skipped (logged once,
        counted in ``skipped[kind]``)."""
        return [p for p in self.parts(kind) if self.check_part(kind, p) is None]

    def check_part(self, kind: str, path: str) -> str | None:
        """None when ``path`` is a readable part of ``kind``, else why not (the footer and schema are read,
        no rows)."""
        if path not in self._checked:
            reason = self._why_unreadable(kind, path)
            self._checked[path] = reason
            if reason is not None:
                self.skipped[kind][path] = reason
                logger.warning("skipping %s: %s", path, reason)
        return self._checked[path]

    def _why_unreadable(self, kind: str, path: str) -> str | None:
        from gradmem import records

        try:
            sch = pq.read_schema(path, filesystem=self.fs)
        except Exception as e:  # noqa: BLE001 - garbage, truncated, or not Parquet at all
            return f"not a readable Parquet file ({type(e).__name__}: {str(e)[:200]})"
        missing = _REQUIRED[kind] - set(sch.names)
        if missing:
            return f"not a {kind} part: lacks columns {sorted(missing)}"
        if any(isinstance(sch.field(c).type, pa.ExtensionType) and c != "memory" for c in _REQUIRED[kind]):
            return "not a part: a key column has an extension type"
        if kind == "memories" and not isinstance(sch.field("memory").type, pa.FixedShapeTensorType):
            return f"not a memories part: 'memory' is {sch.field('memory').type}, not arrow.fixed_shape_tensor"
        for name, is_type in _COLUMN_TYPES[kind].items():
            if name not in sch.names:
                continue
            column_type = sch.field(name).type  # an optional column written all null may have Arrow's null type
            if not (is_type(column_type) or (pa.types.is_null(column_type) and name not in _REQUIRED[kind])):
                return f"not a {kind} part: column {name!r} has type {sch.field(name).type}"
        try:
            metadata = records.table_metadata(sch)
        except UnicodeDecodeError:
            return "not a part: its schema metadata is not UTF-8"
        fingerprint = metadata.get("reader_fingerprint")
        if kind == "memories" and not fingerprint:
            return "not a memories part: no gradmem.reader_fingerprint metadata"
        if kind == "memories" and [metadata.get("m"), metadata.get("d")] != [str(n) for n in sch.field("memory").type.shape]:
            return (f"not a memories part: its metadata says memories of ({metadata.get('m')}, {metadata.get('d')}), "
                    f"its tensors are {tuple(sch.field('memory').type.shape)}")
        self._fingerprints[path] = fingerprint or ""
        self._metadata[path] = metadata
        return None

    def fingerprints(self, kind: str = "memories") -> dict[str, str]:
        """Readable part -> the reader fingerprint its metadata names."""
        return {p: self._fingerprints[p] for p in self.valid_parts(kind)}

    def metadata(self, kind: str = "memories") -> dict[str, dict[str, str]]:
        """Readable part -> its ``gradmem.*`` schema metadata (without the prefix): fingerprint, chunking, ..."""
        return {p: self._metadata[p] for p in self.valid_parts(kind)}

    def read(self, kind: str, columns: Iterable[str] | None = None, parts: list[str] | None = None) -> pa.Table | None:
        """All rows of ``kind`` (or of the given parts) as one table; None when there are none. Parts that
        cannot be read are skipped (``skipped``), never raised. A column that parts written before it existed
        lack (``steps_used``, ``write_target``) is null in their rows, and absent when no part has it."""
        parts = self.valid_parts(kind) if parts is None else [p for p in parts if self.check_part(kind, p) is None]
        if not parts:
            return None
        cols = list(columns) if columns is not None else None
        try:  # one dataset read (parallel) when every part reads; else part by part, skipping the bad ones
            return pads.dataset(parts, filesystem=self.fs, format="parquet").to_table(columns=cols)
        except Exception:  # noqa: BLE001
            pass
        tables = []
        for part in parts:
            table = self._read_part(kind, part, columns)
            if table is not None:
                tables.append(table)
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="permissive")

    def _read_part(self, kind: str, part: str, columns: Iterable[str] | None) -> pa.Table | None:
        try:
            if columns is not None:  # the ones this part has: an older part lacks later columns
                present = set(pq.read_schema(part, filesystem=self.fs).names)
                columns = [c for c in columns if c in present]
            return pq.read_table(part, filesystem=self.fs, columns=columns)
        except Exception as e:  # noqa: BLE001 - a footer that parses but data that does not (truncated pages)
            reason = f"unreadable rows ({type(e).__name__}: {str(e)[:200]})"
            self._checked[part] = reason
            self.skipped[kind][part] = reason
            logger.warning("skipping %s: %s", part, reason)
            return None

    def schema(self, kind: str) -> pa.Schema | None:
        parts = self.valid_parts(kind)
        return pq.read_schema(parts[0], filesystem=self.fs) if parts else None

    def skipped_counts(self) -> dict[str, int]:
        return {kind: len(paths) for kind, paths in self.skipped.items()}

    def chunkings(self, default: Chunking, fingerprint: str | None = None) -> dict[str, Chunking]:
        """Every chunking this store records, by where it is recorded: ``manifest.json`` and each memories part
        (only the parts of reader ``fingerprint`` when given: another reader's parts are refused anyway). What
        was written before chunkings were recorded counts as ``default`` (the reader's limit, no overlap)."""
        found = {path: recorded(meta, default) for path, meta in self.metadata("memories").items()
                 if fingerprint is None or meta.get("reader_fingerprint") == fingerprint}
        manifest = self.manifest()
        if manifest is not None:
            found["manifest.json"] = recorded(manifest, default)
        return found

    def manifest(self) -> dict[str, Any] | None:
        return self._read_json(MANIFEST)

    def served(self) -> dict[str, Any] | None:
        """The served-reader pointer (``write_served``), or None when no upgrade has set one."""
        pointer = self._read_json(SERVED)
        if pointer is not None and not all(isinstance(pointer.get(k), str) for k in ("reader", "fingerprint")):
            raise ValueError(f"{SERVED} in the store needs 'reader' and 'fingerprint' as strings; it holds keys "
                             f"{sorted(pointer)[:10]}")
        return pointer

    def _read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON object file of the store, or None when absent; a ValueError naming the file when it is not one
        (not UTF-8, not JSON, or JSON of another type): every caller then fails with that one clear message."""
        path = f"{self.root}/{name}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json_object(f.read(), f"{name} in the store (rewrite or remove it)")

    def read_memories(self, columns: Iterable[str]) -> pa.Table | None:
        """``columns`` of every memory row plus ``fingerprint`` (the reader its part names) and ``revision`` (0
        in parts written before the column existed); None when the store holds no memories."""
        wanted = [c for c in columns if c not in ("fingerprint", "revision")]
        by_reader: dict[str, list[str]] = {}
        for part, fingerprint in self.fingerprints("memories").items():
            by_reader.setdefault(fingerprint, []).append(part)
        tables = []
        for fingerprint, parts in sorted(by_reader.items()):
            table = self.read("memories", [*wanted, "revision"], parts=parts)
            if table is None:
                continue
            revision = (pc.fill_null(table.column("revision"), 0) if "revision" in table.column_names
                        else pa.array([0] * table.num_rows, pa.int32()))
            for name in wanted:  # a column every part of this reader predates (write_target, steps_used): null
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(table.num_rows))
            table = table.select(wanted).append_column("revision", revision.cast(pa.int32()))
            tables.append(table.append_column("fingerprint", pa.array([fingerprint] * table.num_rows, pa.string())))
        return pa.concat_tables(tables, promote_options="permissive") if tables else None


# ---------------------------------------------------------------------------------------------- current memories
def supersedes(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether row ``new`` replaces ``old`` as the current memory of their (reader, doc_id, chunk): a higher
    revision wins; at an equal revision the row seen first stays (another memory_id there is a conflict)."""
    return int(new.get("revision") or 0) > int(old.get("revision") or 0)


def current_memories(table: pa.Table | None) -> tuple[pa.Table | None, int]:
    """The current row of each (fingerprint, doc_id, chunk) of ``read_memories`` output (its highest revision;
    the first such row in table order), and how many other rows share that revision (duplicates: the same
    memory written twice, or two contents under one id; a superseded revision is not one)."""
    if table is None:
        return None, 0
    keep: dict[tuple, int] = {}
    ties: dict[tuple, int] = {}
    rows = table.select(["fingerprint", "doc_id", "chunk", "revision"]).to_pylist()
    for i, row in enumerate(rows):
        key = (row["fingerprint"], row["doc_id"], row["chunk"])
        known = keep.get(key)
        if known is None or supersedes(row, rows[known]):
            keep[key], ties[key] = i, 0
        elif not supersedes(rows[known], row):
            ties[key] += 1
    return table.take(pa.array(sorted(keep.values()), pa.int64())), sum(ties.values())


def describe_readers(store: MemoryStore) -> dict[str, dict[str, Any]]:
    """Which readers and write settings the store holds: per reader fingerprint, its memories (all rows and
    current ones), documents, and per write setting (steps, lr, target, min_steps, precision) and revision how many current
    memories have it. The manifest carries this, so a store of several readers says which is which."""
    from gradmem import records

    table = store.read_memories(["doc_id", "chunk", "memory_id", *records.SETTING_COLUMNS])
    current, _ = current_memories(table)
    out: dict[str, dict[str, Any]] = {}
    if table is None:
        return out
    for fp in sorted(set(table.column("fingerprint").to_pylist())):
        out[fp] = {"rows": 0, "memories": 0, "documents": set(), "settings": {}}
    for row in table.select(["fingerprint"]).to_pylist():
        out[row["fingerprint"]]["rows"] += 1
    for row in current.to_pylist():
        entry = out[row["fingerprint"]]
        entry["memories"] += 1
        entry["documents"].add(row["doc_id"])
        setting = json.dumps([*records.setting_columns(records.write_setting(row)).values(), row["revision"]])
        entry["settings"][setting] = entry["settings"].get(setting, 0) + 1
    for entry in out.values():
        entry["documents"] = len(entry["documents"])
        entry["settings"] = [dict(zip([*records.SETTING_COLUMNS, "revision", "memories"], [*json.loads(k), n]))
                             for k, n in sorted(entry["settings"].items())]
    return out


# ---------------------------------------------------------------------------------------------- lookups
class IncompleteDocument(LookupError):
    """A chunked document whose chunks are not all in the store (or disagree on how many there are)."""

    def __init__(self, doc_id: str, n_chunks: int, missing: list[int], counts: list[int], beyond: list[int]):
        self.doc_id, self.n_chunks, self.missing = doc_id, n_chunks, missing
        if len(counts) > 1:
            what = f"its chunks disagree on how many there are ({', '.join(map(str, counts))})"
        elif beyond:
            what = f"chunk {beyond[0]} lies outside its {n_chunks} chunks"
        else:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            what = f"chunk{'s' if len(missing) > 1 else ''} {shown} of {n_chunks} missing from the store"
        super().__init__(f"document {doc_id!r} is incomplete: {what}")


class MemoryIndex:
    """Where each memory lives, over the store's readable parts.

    ``by_doc``: (doc_id, chunk) -> memory_id; ``entries``: (doc_id, chunk) -> that row's entry (its own doc_id,
    part, n_chunks, fingerprint, revision); ``by_id``: memory_id -> the first entry indexed with that memory.
    Documents with the same text share a memory_id but keep their own entries: look rows up with ``entry``, and
    all the chunks of a document, in chunk order, with ``document``.

    ``fingerprint``: the reader whose memories ``by_doc`` and ``entries`` hold (a service's served reader); None:
    whichever reader wrote a (doc_id, chunk) first. ``writers`` keeps every reader's current entry of each
    (doc_id, chunk), so a caller can say which reader wrote a document the indexed reader cannot read. Per reader
    the current memory is the highest revision (``supersedes``): a repaired memory replaces the weak one the moment
    its part is indexed.

    ``refresh`` reads only parts it has not seen (a few small columns each), so a service can call it when an
    id is unknown and pick up what a batch job or another replica wrote since. A (doc_id, chunk) written twice
    by one reader with different content at the same revision keeps the first part's memory (parts are listed in
    name order) and is counted in ``conflicts``; unreadable parts are skipped and counted in ``stats()``."""

    def __init__(self, store: MemoryStore, fingerprint: str | None = None):
        self.store = store
        self.fingerprint = fingerprint
        self.by_id: dict[str, dict[str, Any]] = {}
        self.by_doc: dict[tuple[str, int], str] = {}
        self.entries: dict[tuple[str, int], dict[str, Any]] = {}
        self.writers: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        self.chunks: dict[str, set[int]] = {}  # doc_id -> the chunk numbers indexed, whatever parts hold them
        self.parts: set[str] = set()
        self.conflicts = 0

    def refresh(self) -> int:
        """Index new parts; returns how many (doc_id, chunk) rows were added."""
        from gradmem import records

        added = 0
        for part in self.store.valid_parts("memories"):
            if part in self.parts:
                continue
            table = self.store.read("memories", ["memory_id", "doc_id", "chunk", "n_chunks", "revision"], parts=[part])
            if table is None:
                continue  # unreadable: skipped and counted by the store
            fingerprint = records.table_metadata(table).get("reader_fingerprint", "")
            for row in table.to_pylist():
                added += self.add({**row, "revision": row.get("revision") or 0, "part": part,
                                   "fingerprint": fingerprint})
            self.parts.add(part)
        return added

    def add(self, entry: dict[str, Any]) -> int:
        """Index one row; returns 1 when its (doc_id, chunk) is new to ``entries``."""
        entry = {**entry, "revision": entry.get("revision") or 0}
        key = (entry["doc_id"], entry["chunk"])
        by_reader = self.writers.setdefault(key, {})
        known = by_reader.get(entry["fingerprint"])
        if known is not None and not supersedes(entry, known):
            if known["memory_id"] != entry["memory_id"] and not supersedes(known, entry):
                self.conflicts += 1
            return 0
        by_reader[entry["fingerprint"]] = entry
        self.by_id.setdefault(entry["memory_id"], entry)
        shown = self.entries.get(key)
        if self.fingerprint is not None and entry["fingerprint"] != self.fingerprint:
            return 0
        if shown is not None and shown["fingerprint"] != entry["fingerprint"]:
            return 0  # any reader (no fingerprint): the first reader seen keeps the document
        self.by_doc[key] = entry["memory_id"]
        self.entries[key] = entry
        self.chunks.setdefault(entry["doc_id"], set()).add(entry["chunk"])
        return int(shown is None)

    def written_by(self, doc_id: str, chunk: int = 0) -> list[str]:
        """The readers holding a current memory of (doc_id, chunk), indexed or not."""
        return sorted(self.writers.get((doc_id, chunk), {}))

    def document(self, doc_id: str) -> list[dict[str, Any]] | None:
        """The entries of every chunk of ``doc_id``, in chunk order, wherever the store's parts put them; None when
        the document is unknown. ``IncompleteDocument`` when a chunk is missing or the chunks disagree on their
        count: a READ over what is there would answer from part of the document without saying so."""
        found = {c: self.entries[(doc_id, c)] for c in self.chunks.get(doc_id, ()) if (doc_id, c) in self.entries}
        if not found:
            return None
        counts = sorted({e["n_chunks"] for e in found.values()})
        wanted = counts[-1]
        missing = [c for c in range(wanted) if c not in found]
        beyond = sorted(c for c in found if not 0 <= c < wanted)
        if len(counts) > 1 or missing or beyond:
            raise IncompleteDocument(doc_id, wanted, missing, counts, beyond)
        return [found[c] for c in range(wanted)]

    def entry(self, memory_id: str | None = None, doc_id: str | None = None, chunk: int = 0) -> dict[str, Any] | None:
        """The row asked for: by doc_id (and chunk) the row of that doc_id, by memory_id the first row with
        that memory; None when unknown."""
        if doc_id is not None:
            return self.entries.get((doc_id, chunk))
        return self.by_id.get(memory_id) if memory_id is not None else None

    def stats(self) -> dict[str, Any]:
        return {"memories": len(self.by_id), "documents": len(self.entries), "parts": len(self.parts),
                "readers": len({fp for w in self.writers.values() for fp in w}),
                "conflicts": self.conflicts, "skipped_parts": len(self.store.skipped["memories"])}

    def __len__(self) -> int:
        return len(self.by_id)
