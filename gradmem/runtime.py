"""Process set-up for entrypoints (jobs/, benchmarks/) and workers: CPU speed flags, logging, a loopback port.
Called explicitly, never on import."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys

import torch


def configure_cpu(threads: int | None = None) -> None:
    """Flush denormals to zero, then set the intra-op thread count.

    Denormal floats (tiny gradients, far-tail softmax terms) make x86 arithmetic 10-100x slower; meta-training
    produces them. The flag lives in each thread's FP control register, and OpenMP workers copy it when they are
    created, so it must be set before ``set_num_threads`` creates them.
    """
    torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(threads)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr, and apply the process-wide CPU settings (flush denormals) every entrypoint wants."""
    configure_cpu()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars on every checkpoint drown the progress log


def reserved_device(gpus: float) -> str:
    """The device of a worker that reserved ``gpus`` GPUs from its scheduler: "cuda" when it reserved some, else
    "cpu".

    Decided by the reservation, not by what the process sees: Ray (2.60) leaves CUDA_VISIBLE_DEVICES as it is for
    an actor that reserves no GPU, so on a GPU node such an actor would write on a GPU the scheduler gave to
    another. A reservation with no visible GPU is an error: a silent CPU fallback would run a GPU job at a CPU's
    speed."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"this worker reserved {gpus:g} GPU(s), but torch {torch.__version__} sees no CUDA device: "
                           "install a CUDA build of torch on the GPU nodes, or reserve no GPU")
    return "cuda"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (for local services). Bound together, then released:
    asked one at a time, the OS may hand back the port it has just released, and two services would get one port."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local service)."""
    return free_ports(1)[0]
