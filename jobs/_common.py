"""Small helpers shared by the entrypoints (sys.path for running from a checkout, a loopback-only local Ray).

Logging and CPU set-up live in ``gradmem.runtime`` (shared with benchmarks/); re-exported here so every job
imports its set-up from one place."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/x.py` from a checkout (or a Ray working_dir) without installing
    sys.path.insert(0, str(ROOT))


if "RAY_ADDRESS" not in os.environ:  # a local Ray started by a job binds 127.0.0.1 only (read at Ray's import)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only cluster of this one job

from gradmem.runtime import free_port, setup_logging  # noqa: E402,F401 (after sys.path: a checkout needs it)


def send_stderr_to(path: Path) -> None:
    """Quiet mode for a job that tells its own story on stdout: everything written to stderr from here on (our
    logs, Ray's driver-side logs, warnings, native libraries, the processes this one starts) goes to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def connect_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else start a local Ray for this job
    whose workers import this checkout (PYTHONPATH). Nothing when Ray is already up in this process."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}} if "RAY_ADDRESS" not in os.environ else None)


@contextlib.contextmanager
def refusals(command: str) -> Iterator[None]:
    """A job's refusal to start (a ValueError, FileNotFoundError or FileExistsError: another reader's or setting's
    store, a missing input, a malformed manifest or data file, a run that already exists) as one line on stderr and
    exit 2. A Ray task's failure is not one: Ray's task errors also subclass their cause's type, so they are let
    through with their traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        from ray.exceptions import RayError

        if isinstance(exc, RayError):
            raise
        print(f"{command}: {exc}", file=sys.stderr)
        sys.exit(2)
