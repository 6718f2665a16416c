"""Resolve a storage location (a local directory or ``s3://bucket/prefix``) into a pyarrow filesystem.

S3-compatible servers (SeaweedFS, MinIO, Ceph) are reached with an endpoint override: ``--s3-endpoint`` or the
standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` environment; credentials and region come from the
standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Storage:
    uri: str  # as the user gave it
    path: str  # the path inside ``filesystem`` (bucket/prefix for S3, absolute for local)
    filesystem: pafs.FileSystem

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, s3_endpoint: str | None = None) -> Storage:
    """``s3://bucket/prefix`` -> S3 filesystem and ``bucket/prefix``; anything else -> a local absolute path."""
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise ValueError(f"{uri!r}: an S3 location needs a bucket")
        return Storage(uri, path, s3_filesystem(s3_endpoint))
    if "://" in uri:
        raise ValueError(f"{uri!r}: only local paths and s3:// locations are supported")
    return Storage(uri, str(Path(uri).expanduser().resolve()), pafs.LocalFileSystem())


def local_dir(uri: str, s3_endpoint: str | None = None, skip_suffixes: tuple[str, ...] = ()) -> str:
    """A local directory with the contents of ``uri``: the path itself when local, else a per-process cached
    download (readers on S3 reach every actor this way). ``skip_suffixes`` leaves files out (weights, when a
    task needs only the tokenizer)."""
    store = resolve(uri, s3_endpoint)
    if not store.is_s3:
        return store.path
    key = (uri, s3_endpoint, skip_suffixes)
    if key not in _DOWNLOADS:
        import tempfile

        target = tempfile.mkdtemp(prefix="gradmem-dir-")
        selector = pafs.FileSelector(store.path, recursive=True)
        infos = [i for i in store.filesystem.get_file_info(selector) if i.type == pafs.FileType.File]
        if not infos:
            raise FileNotFoundError(f"{uri}: no files there")
        for info in infos:
            if skip_suffixes and info.base_name.endswith(skip_suffixes):
                continue
            dest = Path(target) / info.path[len(store.path) :].lstrip("/")
            if not Path(os.path.normpath(dest)).is_relative_to(target):  # a key with "../" parts: never outside
                raise ValueError(f"{uri}: the object {info.path!r} would land outside the download directory")
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(dest), source_filesystem=store.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
        _DOWNLOADS[key] = target
    return _DOWNLOADS[key]


_DOWNLOADS: dict[tuple, str] = {}
