"""Process-wide CPU settings that matter for speed. Called by entrypoints and workers, never on import."""

from __future__ import annotations

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
