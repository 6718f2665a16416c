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
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only cluster of this one job


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr, and apply the process-wide CPU settings (flush denormals) every entrypoint wants."""
    from gradmem.runtime import configure_cpu

    configure_cpu()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars on every checkpoint drown the progress log


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local service)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bar_plot(path: str, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    """A bar chart PNG of a benchmark's figures (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels)), 3.6))
    bars = ax.bar(range(len(values)), values, color="#4472c4")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def benchmark_parser(doc: str, config_help: str):
    """The arguments every training benchmark (capacity, compare) takes: config, output, step override, threads,
    device. Callers add their own and pass the result to ``start_benchmark``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--output", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override every method's training steps (smoke runs; a different config for resume)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def start_benchmark(args) -> str:
    """Logging and threads as asked; a negative --max-steps refused; returns the device to train on."""
    import torch

    from gradmem.runtime import configure_cpu

    setup_logging()
    if args.threads is not None:
        configure_cpu(threads=args.threads)
    if args.max_steps is not None and args.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")
