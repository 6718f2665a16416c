"""Small helpers shared by the entrypoints (logging set-up, sys.path for running from a checkout)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/x.py` from a checkout (or a Ray working_dir) without installing
    sys.path.insert(0, str(ROOT))


if "RAY_ADDRESS" not in os.environ:  # a local Ray started by a job binds 127.0.0.1 only (read at Ray's import)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr, and apply the process-wide CPU settings (flush denormals) every entrypoint wants."""
    from gradmem.runtime import configure_cpu

    configure_cpu()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
