"""What the benchmarks share: process set-up, the command line of the training grids, the paper's key-value
reader, timing, and the report helpers (atomic files, JSON-safe values, provenance, config merging, plots).

The capacity grid (benchmarks/capacity.py) and the task comparison (benchmarks/compare.py) write their cells and
results with these, so a crash never leaves half a file and every result names the commit and device it came from.
Every benchmark imports this module first: a local Ray it starts binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gradmem.atomic import atomic_path, write_atomic  # noqa: F401 - write_atomic: the benchmarks import it here
from gradmem.runtime import configure_cpu, setup_logging

ROOT = Path(__file__).resolve().parents[1]

if "RAY_ADDRESS" not in os.environ:  # as for jobs/: a local Ray started here binds 127.0.0.1 only (read at Ray's import)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only cluster of this one benchmark


# ---------------------------------------------------------------------------------------------- command line
def benchmark_parser(doc: str, config_help: str) -> argparse.ArgumentParser:
    """The arguments every training grid (capacity, compare) takes: config, output, step override, threads,
    device. Callers add their own and pass the result to ``start_benchmark``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--output", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override every method's training steps (smoke runs; a different config for resume)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def start_benchmark(args: argparse.Namespace) -> str:
    """Logging and threads as asked; a negative --max-steps refused; returns the device to train on."""
    setup_logging()
    if args.threads is not None:
        configure_cpu(threads=args.threads)
    if args.max_steps is not None and args.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def grid_main(name: str, doc: str, config_help: str, load: Callable[[str, list[str] | None], Any],
              run: Callable[..., dict[str, Any]], argv: list[str] | None) -> dict[str, Any]:
    """The command line of a training grid with ``--only`` (compare, compose): parse, load the config with
    ``load(path, only)`` (a bad one exits 2 with the reason), run ``run(cfg, output, only=, max_steps=, command=,
    repo_root=, device=)`` into ``--output`` (default runs/<config name>), print results.md, return the summary."""
    parser = benchmark_parser(doc, config_help)
    parser.add_argument("--only", default=None, help="comma-separated method names to run (default: all)")
    args = parser.parse_args(argv)
    only = [method for method in args.only.split(",") if method] if args.only else None
    try:
        device = start_benchmark(args)
        cfg = load(args.config, only)
    except (OSError, ValueError) as exc:
        print(f"{name}: bad config {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    output = args.output or str(ROOT / "runs" / Path(args.config).name.removesuffix(".yaml"))
    command = ["python", "-m", f"benchmarks.{name}", *(sys.argv[1:] if argv is None else argv)]
    summary = run(cfg, output, only=only, max_steps=args.max_steps, command=command, repo_root=ROOT, device=device)
    print((Path(output) / "results.md").read_text())
    return summary


# ---------------------------------------------------------------------------------------------- speed
def paper_reader():
    """The paper's key-value reader (4 layers, d = 128, 8 memory vectors, K = 2), weights from seed 0: speed does
    not depend on their values."""
    from gradmem import MemoryConfig, Reader
    from gradmem.tasks.kv import kv_tokenizer
    from gradmem.train import ModelConfig, build_backbone_config

    tok = kv_tokenizer()
    torch.manual_seed(0)
    backbone = build_backbone_config(ModelConfig(), len(tok), tok)
    return Reader.from_config(backbone, tok, MemoryConfig(num_memory=8, write_steps=2, write_lr=0.04))


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- reports


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``extra`` merged in, mappings recursively."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def jsonable(obj: Any) -> Any:
    """JSON-native copy: NaN and inf become None (json would write non-standard NaN, and NaN != NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def git_commit(root: Path) -> dict[str, Any]:
    """HEAD of the checkout at ``root`` and whether the tree had uncommitted changes (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip() != ""
        return {"commit": head, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def device_name(device: str) -> str:
    """What ran the cells, for the record (timings only compare on the same kind)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores)"


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal for the report tables; '-' when there is none."""
    return "-" if x is None else f"{100 * x:.1f}"
