"""The accelerator's paths against the CPU's: a WRITE, the second-order meta-step, each attention kernel, the compiled
paths and bf16 arithmetic on the device compute what the plain float32 CPU path computes, to stated tolerances.

CPU tests cannot reach these paths: CUDA has its own SDPA kernels (memory-efficient, cuDNN, flash), its own matrix
products (TF32 off by default in PyTorch) and Inductor's Triton code. So every test here needs CUDA and is skipped
with that reason elsewhere; ``make gpu-bench`` runs this module first on a GPU machine, before it measures
anything. ``GRADMEM_TEST_DEVICE=cpu`` runs the same tests on the CPU against itself: a check of the tests' own
code on a machine without a GPU, not of any CUDA path.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import ARCHS, make_reader
from gradmem import records
from gradmem.attention import attention_path
from gradmem.data import collate
from gradmem.read import read_teacher_forced
from gradmem.tasks.kv import UNSCORED, KVTask
from gradmem.train import OptimConfig, meta_step
from gradmem.write import write_memory

DEVICE = os.environ.get("GRADMEM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs CUDA: these tests compare the GPU's kernels with the CPU's (make gpu-bench runs them first on a "
           "GPU machine; GRADMEM_TEST_DEVICE=cpu checks the tests' own code here)",
)
# float32 on both sides; the CUDA side's kernels sum in other orders (and SDPA's fused kernels differ more)
ATOL = 2e-4


def examples():
    """Contexts of 1..6 key-value pairs: lengths differ, so every batch is padded."""
    return [ex for n in range(1, 7) for ex in KVTask(n).examples(2, seed=n)]


def pair(arch: str, frozen: bool = True, **memory):
    """The same reader (same seed, same weights) on the CPU and on the device."""
    cpu, dev = make_reader(arch, **memory), make_reader(arch, **memory).to(DEVICE)
    if frozen:
        cpu.freeze(), dev.freeze()
    return cpu, dev


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = 1e-3) -> bool:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return bool(torch.isfinite(a).all()) and bool(torch.allclose(a, b, atol=atol, rtol=rtol))


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_write_on_the_device_is_the_cpu_write_with_the_same_memory_ids(arch):
    """Reader.write_tokens with the defaults a user gets (on CUDA: SDPA, which picks a fused kernel) against the
    CPU's write: memories, losses and accuracies equal to tolerance, and the same content addresses (a memory's id
    names reader, setting and tokens, never the device)."""
    cpu, dev = pair(arch)
    assert dev.fingerprint == cpu.fingerprint
    ids = cpu.encode_contexts([ex.context for ex in examples()])
    a, b = cpu.write_tokens(ids, batch_size=5), dev.write_tokens(ids, batch_size=5)
    assert b.tensor.device.type == "cpu"  # memories come back to the host, whatever wrote them
    assert close(a.tensor, b.tensor), worst(a.tensor, b.tensor)
    assert close(a.stats.losses, b.stats.losses), worst(a.stats.losses, b.stats.losses)
    assert (a.stats.accuracy - b.stats.accuracy).abs().max() <= 0.1  # one token of a 10-token context, at most
    ids_a = [records.memory_id(cpu.fingerprint, a.setting, seq) for seq in ids]
    ids_b = [records.memory_id(dev.fingerprint, b.setting, seq) for seq in ids]
    assert ids_a == ids_b


# sdpa_flash is left out: the flash kernel takes no attention mask, and every padded batch carries one
@pytest.mark.parametrize("path", ["eager", "sdpa", "sdpa_math", "sdpa_efficient"])
def test_each_attention_path_on_the_device_writes_the_cpu_s_eager_memory(path):
    if path == "sdpa_efficient" and DEVICE != "cuda":
        pytest.skip("the memory-efficient SDPA kernel exists on CUDA only")
    cpu, dev = pair("llama")
    batch = collate(examples(), cpu.tokenizer)
    with attention_path(cpu.lm, "eager"):
        want = write_memory(cpu, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="inference")
    with attention_path(dev.lm, path):
        got = write_memory(dev, batch.ctx_ids.to(DEVICE), batch.ctx_mask.to(DEVICE), 2, 0.5, mode="inference")
    assert close(want.memory, got.memory), (path, worst(want.memory, got.memory))
    assert close(want.losses, got.losses), (path, worst(want.losses, got.losses))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_second_order_meta_step_on_the_device_has_the_cpu_s_loss_and_gradients(arch):
    """The outer loss and every weight's gradient through the WRITE (full second order, auxiliary write loss), on
    the math attention path both sides (the only one with a double backward)."""
    cpu, dev = pair(arch, frozen=False)
    batch = collate(examples(), cpu.tokenizer, unscored=UNSCORED)
    optim = OptimConfig(attention="sdpa_math", aux_write_loss=0.5)
    grads = []
    for reader, b in ((cpu, batch), (dev, batch.to(DEVICE))):
        loss, _ = meta_step(reader.train(), b, optim, steps=2, lr=0.5)
        loss.backward()
        grads.append((loss, {n: p.grad for n, p in reader.named_parameters() if p.grad is not None}))
    (loss_cpu, g_cpu), (loss_dev, g_dev) = grads
    assert close(loss_cpu, loss_dev), (float(loss_cpu), float(loss_dev))
    assert set(g_cpu) == set(g_dev) and "memory" in g_cpu
    for name, g in g_cpu.items():
        scale = float(g.abs().max())
        assert scale > 0, f"{name}: no gradient, a vacuous check"
        assert worst(g, g_dev[name]) <= 1e-3 * scale + 1e-6, (name, worst(g, g_dev[name]), scale)


@pytest.mark.slow  # compiles: the backbone for writes, the gradient step with its double backward
def test_the_compiled_paths_on_the_device_compute_the_eager_paths():
    """Reader.compile() for inference writes and compile_write_step for the meta-step, both on the device, against
    the same reader's eager paths on the device (Inductor's Triton code against PyTorch's kernels)."""
    _, dev = pair("llama")
    batch = collate(examples(), dev.tokenizer, unscored=UNSCORED).to(DEVICE)
    eager = write_memory(dev, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="inference")
    dev.compile()
    compiled = write_memory(dev, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="inference")
    assert close(eager.memory, compiled.memory), worst(eager.memory, compiled.memory)

    _, train = pair("llama", frozen=False)
    optim = OptimConfig(attention="sdpa_math", aux_write_loss=0.5)

    def step():
        train.zero_grad(set_to_none=True)
        loss, _ = meta_step(train.train(), batch, optim, steps=2, lr=0.5)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in train.named_parameters() if p.grad is not None}

    loss_plain, g_plain = step()
    train.compile_write_step()
    loss_compiled, g_compiled = step()
    assert close(loss_plain, loss_compiled)
    for name, g in g_plain.items():
        assert worst(g, g_compiled[name]) <= 1e-3 * float(g.abs().max()) + 1e-6, name


def test_a_bf16_write_on_the_device_stays_near_the_float32_write():
    """precision='bfloat16' (autocast; the memory stays float32) against float32, both on the device: bf16's 8-bit
    mantissa bounds how near; a wrong cast (a memory rounded to bf16 between steps, say) would land far off."""
    _, dev = pair("llama")
    ids = dev.encode_contexts([ex.context for ex in examples()])
    full = dev.write_tokens(ids, dev.write_setting(precision="float32"))
    half = dev.write_tokens(ids, dev.write_setting(precision="bfloat16"))
    assert half.tensor.dtype == torch.float32
    assert (half.tensor.bfloat16().float() != half.tensor).any()  # not rounded to bf16 anywhere on the way
    moved = (full.tensor - dev.memory.detach().cpu()).abs().max()  # how far the WRITE moved M0
    assert moved > 0
    assert worst(full.tensor, half.tensor) <= 0.05 * float(moved), (worst(full.tensor, half.tensor), float(moved))
    assert close(full.stats.losses, half.stats.losses, atol=0.05, rtol=0.02)


def test_a_read_on_the_device_scores_the_cpu_s_memories_as_the_cpu_does():
    """Teacher-forced READ of memories written on the CPU: the device's per-sample losses are the CPU's."""
    cpu, dev = pair("llama")
    batch = collate(examples(), cpu.tokenizer, unscored=UNSCORED)
    memory = write_memory(cpu, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="inference").memory  # (B, m, d)
    with torch.no_grad():
        want = read_teacher_forced(cpu, memory, batch.read_ids, batch.target_mask).loss
        got = read_teacher_forced(dev, memory.to(DEVICE), batch.read_ids.to(DEVICE),
                                  batch.target_mask.to(DEVICE)).loss
    assert close(want, got), worst(want, got)
