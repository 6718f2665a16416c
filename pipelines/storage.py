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
