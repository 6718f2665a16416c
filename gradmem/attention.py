"""Attention paths, and which of them survive a second derivative.

Meta-training differentiates through the inner-loop gradient (``create_graph=True``), so the backward of
attention is itself differentiated. PyTorch's fused SDPA kernels (flash, memory-efficient, and the CPU flash
kernel SDPA picks by default) have backwards that are not differentiable; only the math path (eager attention,
or SDPA restricted to its math backend) is. Inference writes need first derivatives only and may use any path:
that is where the fast kernels pay off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

# name -> (Hugging Face attn_implementation, SDPA backends to allow or None for PyTorch's own choice)
ATTENTION_PATHS: dict[str, tuple[str, list[SDPBackend] | None]] = {
    "eager": ("eager", None),
    "sdpa": ("sdpa", None),
    "sdpa_math": ("sdpa", [SDPBackend.MATH]),
    "sdpa_flash": ("sdpa", [SDPBackend.FLASH_ATTENTION]),
    "sdpa_efficient": ("sdpa", [SDPBackend.EFFICIENT_ATTENTION]),
    "flash_attention_2": ("flash_attention_2", None),
}
SECOND_ORDER_SAFE = ("eager", "sdpa_math")


def write_attention(device_type: str, precision: str) -> str:
    """The attention path an inference WRITE takes when its caller names none: the fastest measured for this
    device type and arithmetic (``gradmem.memory.WRITE_PRECISIONS``).

    SDPA everywhere but one case: on CPU in bfloat16, SDPA's CPU flash kernel (forward and, above all, its
    backward) is slower than the plain matrix products and softmax of the eager path, which Inductor also fuses.
    Measured on the paper's key-value reader (N = 16, batch 64, one thread, AMD EPYC, 2026-12-01; figures in
    docs/results/README.md): 62.3 against 42.6 contexts/s uncompiled, 80.5 against 48.8 compiled. In float32
    SDPA is the faster or equal (36.9 against 33.6). Both paths compute the same attention; the choice changes
    rounding only, never a memory's id."""
    if device_type == "cpu" and precision == "bfloat16":
        return "eager"
    return "sdpa"


def check_attention(path: str, second_order: bool) -> None:
    """Fail fast on an unknown path, or on one that cannot be differentiated twice when that is needed."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"unknown attention path {path!r}; choose one of {sorted(ATTENTION_PATHS)}")
    if second_order and path not in SECOND_ORDER_SAFE:
        raise ValueError(
            f"attention path {path!r} cannot be used for second-order meta-training: the flash and "
            "memory-efficient attention kernels (and flash_attention_2) have no double backward, so the "
            "gradient through the WRITE steps would fail or be wrong. Use attention: sdpa_math (SDPA's math "
            "backend) or eager for training; fast kernels remain available for inference writes."
        )


@contextlib.contextmanager
def attention_path(lm: PreTrainedModel, path: str) -> Iterator[None]:
    """Run the enclosed forwards with the named attention path.

    The Hugging Face implementation is switched only when it differs (a cheap attribute check); the SDPA
    backend restriction is scoped to the block.
    """
    check_attention(path, second_order=False)
    implementation, backends = ATTENTION_PATHS[path]
    if lm.config._attn_implementation != implementation:
        lm.set_attn_implementation(implementation)
    if backends is None:
        yield
    else:
        with sdpa_kernel(backends):
            yield
