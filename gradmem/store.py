"""The memory store: a directory of Parquet parts that batch jobs append to and services read from.

    ROOT/memories/part-<hash>.parquet   memory records (gradmem.records.schema)
    ROOT/errors/part-<hash>.parquet     inputs that did not become memories (gradmem.records.error_schema)
    ROOT/manifest.json                  the last run's counts, reader fingerprint and write settings

ROOT is any pyarrow filesystem location (a local directory, an S3 bucket/prefix). Parts are immutable and
named by a hash of their rows, so writing the same rows twice (a retried task) lands on the same name instead
of duplicating them. A part becomes visible only when complete: locally it is written under a hidden name
and renamed; on S3 an object appears when its upload completes. Readers list ``part-*.parquet`` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

KINDS = ("memories", "errors")
_KEY_COLUMNS = {"memories": "memory_id", "errors": "error_id"}


class MemoryStore:
    def __init__(self, filesystem: pafs.FileSystem, root: str):
        self.fs = filesystem
        self.root = root.rstrip("/")

    def _dir(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown part kind {kind!r}; choose one of {KINDS}")
        return f"{self.root}/{kind}"

    # ------------------------------------------------------------------ writing
    def write_part(self, kind: str, table: pa.Table) -> str | None:
        """Write ``table`` as one immutable part; returns its path (None for an empty table)."""
        if table.num_rows == 0:
            return None
        keys = sorted(table.column(_KEY_COLUMNS[kind]).to_pylist())
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
        directory = self._dir(kind)
        path = f"{directory}/part-{digest}.parquet"
        self.fs.create_dir(directory, recursive=True)
        self._atomic_write(path, lambda sink: pq.write_table(table, sink, compression="zstd"))
        return path

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        self.fs.create_dir(self.root, recursive=True)
        self._atomic_write(f"{self.root}/manifest.json", lambda sink: sink.write(body))

    def _atomic_write(self, path: str, write) -> None:
        if isinstance(self.fs, pafs.LocalFileSystem):
            directory, name = path.rsplit("/", 1)
            tmp = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"  # hidden: no reader lists it
            try:
                with self.fs.open_output_stream(tmp) as sink:
                    write(sink)
                self.fs.move(tmp, path)  # rename: atomic on one filesystem
            finally:
                if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                    self.fs.delete_file(tmp)
        else:  # object stores publish an object only when its upload completes
            with self.fs.open_output_stream(path) as sink:
                write(sink)

    # ------------------------------------------------------------------ reading
    def parts(self, kind: str) -> list[str]:
        directory = self._dir(kind)
        if self.fs.get_file_info(directory).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(directory, recursive=False))
        return sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))

    def read(self, kind: str, columns: Iterable[str] | None = None, parts: list[str] | None = None) -> pa.Table | None:
        """All rows of ``kind`` (or of the given parts) as one table; None when there are none."""
        parts = self.parts(kind) if parts is None else parts
        if not parts:
            return None
        dataset = pads.dataset(parts, filesystem=self.fs, format="parquet")
        return dataset.to_table(columns=list(columns) if columns is not None else None)

    def schema(self, kind: str) -> pa.Schema | None:
        parts = self.parts(kind)
        return pq.read_schema(parts[0], filesystem=self.fs) if parts else None

    def manifest(self) -> dict[str, Any] | None:
        path = f"{self.root}/manifest.json"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())


# ---------------------------------------------------------------------------------------------- lookups
class MemoryIndex:
    """Where each memory lives: memory_id -> entry and (doc_id, chunk) -> memory_id, over the store's parts.

    ``refresh`` reads only parts it has not seen (a few small columns each), so a service can call it when an
    id is unknown and pick up what a batch job or another replica wrote since. A (doc_id, chunk) written twice
    with different content keeps the first part's memory (parts are listed in name order) and is counted in
    ``conflicts``."""

    def __init__(self, store: MemoryStore):
        self.store = store
        self.by_id: dict[str, dict[str, Any]] = {}
        self.by_doc: dict[tuple[str, int], str] = {}
        self.parts: set[str] = set()
        self.conflicts = 0

    def refresh(self) -> int:
        """Index new parts; returns how many memories were added."""
        from gradmem import records

        added = 0
        for part in self.store.parts("memories"):
            if part in self.parts:
                continue
            table = pq.read_table(part, filesystem=self.store.fs, columns=["memory_id", "doc_id", "chunk", "n_chunks"])
            fingerprint = records.table_metadata(table).get("reader_fingerprint", "")
            for row in table.to_pylist():
                added += self.add({**row, "part": part, "fingerprint": fingerprint})
            self.parts.add(part)
        return added

    def add(self, entry: dict[str, Any]) -> int:
        key = (entry["doc_id"], entry["chunk"])
        known = self.by_doc.get(key)
        if known is not None and known != entry["memory_id"]:
            self.conflicts += 1
            return 0
        new = entry["memory_id"] not in self.by_id
        self.by_id.setdefault(entry["memory_id"], entry)
        self.by_doc[key] = entry["memory_id"]
        return int(new)

    def __len__(self) -> int:
        return len(self.by_id)
