"""Small helpers shared by the entrypoints (logging set-up, sys.path for running from a checkout)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/x.py` from a checkout (or a Ray working_dir) without installing
    sys.path.insert(0, str(ROOT))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
