"""WRITE: per-sample independence, frozen weights, falling loss, gradient modes, and finite differences."""

import pytest
import torch

from gradmem.attention import attention_path
from gradmem.read import read_teacher_forced
from gradmem.write import write_memory
from gradmem.tasks.kv import KVTask
from conftest import make_reader


def test_batched_write_equals_per_sample(reader, kv_batch):
    examples, batch = kv_batch
    reader.eval()
    together = write_memory(reader, batch.ctx_ids, batch.ctx_mask, steps=3, lr=0.5, mode="inference")
    for i, ex in enumerate(examples):
        ids = batch.ctx_ids[i : i + 1, : len(ex.context)]
        alone = write_memory(reader, ids, torch.ones_like(ids), steps=3, lr=0.5, mode="inference")
        assert (together.memory[i] - alone.memory[0]).abs().max() < 1e-5
        assert torch.allclose(together.losses[i], alone.losses[0], atol=1e-5)
    # the public API pads and reorders by length; results must still match sample by sample
    mem = reader.write([ex.context for ex in examples], steps=3, lr=0.5, batch_size=4)
    assert (mem.tensor - together.memory).abs().max() < 1e-5


def test_write_never_changes_weights_and_loss_falls(reader, kv_batch):
    _, batch = kv_batch
    before = {k: v.clone() for k, v in reader.state_dict().items()}
    out = write_memory(reader, batch.ctx_ids, batch.ctx_mask, steps=5, lr=0.5, mode="inference")
    for k, v in reader.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in reader.parameters())
    assert out.losses.shape == (6, 6)
    assert (out.losses[:, 1:] < out.losses[:, :-1]).all(), out.losses  # every SGD step lowers every sample's loss
    assert out.memory.grad_fn is None and not out.memory.requires_grad
    assert ((0 <= out.accuracy) & (out.accuracy <= 1)).all()


def _outer_grads(reader, batch, steps, mode, second_order_steps=None):
    reader.zero_grad(set_to_none=True)
    with attention_path(reader.lm, "eager"):
        out = write_memory(reader, batch.ctx_ids, batch.ctx_mask, steps, 0.5, mode=mode,
                           second_order_steps=second_order_steps, final_stats=False)
        loss = read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask).loss.mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in reader.named_parameters() if p.grad is not None}


def test_second_order_gradients_differ_from_first_order(reader, kv_batch):
    _, batch = kv_batch
    second = _outer_grads(reader, batch, 2, "second_order")
    first = _outer_grads(reader, batch, 2, "first_order")
    assert set(second) - set(first) == {"write_head.weight"}  # without the auxiliary loss
    assert not torch.allclose(second["memory"], first["memory"], atol=1e-6)
    weights = [n for n in second if n.startswith("lm.") and second[n].abs().sum() > 0]
    assert any(not torch.allclose(second[n], first[n], atol=1e-6) for n in weights)
    # only the write head and second-order terms connect the write loss to the write head
    assert "write_head.weight" in second and second["write_head.weight"].abs().sum() > 0
    assert "write_head.weight" not in first
    # truncation: L = 0 is first order, L = K is full second order, L = 1 is in between
    l0 = _outer_grads(reader, batch, 2, "second_order", 0)
    assert set(l0) == set(first) and all(torch.allclose(l0[n], first[n]) for n in first)
    assert all(torch.allclose(_outer_grads(reader, batch, 2, "second_order", 2)[n], second[n]) for n in second)
    last_only = _outer_grads(reader, batch, 2, "second_order", 1)
    assert not torch.allclose(last_only["memory"], second["memory"], atol=1e-7)


def test_inner_step_gradient_matches_finite_differences(arch, kv_batch):
    """d(outer loss)/d(theta) through one second-order WRITE step, against central differences in float64."""
    reader = make_reader(arch, dtype=torch.float64)
    _, batch = kv_batch

    def outer() -> torch.Tensor:
        with attention_path(reader.lm, "eager"):
            out = write_memory(reader, batch.ctx_ids, batch.ctx_mask, 1, 0.5, mode="second_order", final_stats=False)
            return read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask).loss.mean()

    reader.zero_grad(set_to_none=True)
    outer().backward()
    params = dict(reader.named_parameters())
    block0 = "lm.model.layers.0.self_attn.q_proj.weight" if arch == "llama" else "lm.transformer.h.0.attn.c_attn.weight"
    probes = [("memory", (0, 0)), ("memory", (3, 5)), (block0, (1, 2)), ("write_head.weight", (10, 3))]
    eps = 1e-3  # Llama RMSNorm computes in fp32 even in a float64 model: keep eps well above its noise
    for name, idx in probes:
        p = params[name]
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + eps
            up = outer().item()
            p[idx] = orig - eps
            down = outer().item()
            p[idx] = orig
        numeric = (up - down) / (2 * eps)
        analytic = p.grad[idx].item()
        assert abs(numeric - analytic) <= 1e-5 + 1e-3 * abs(numeric), (name, idx, numeric, analytic)
        assert abs(numeric) > 1e-9, f"probe {name}{idx} has no gradient: a vacuous check"


def test_zero_steps_returns_m0(reader, kv_batch):
    _, batch = kv_batch
    out = write_memory(reader, batch.ctx_ids, batch.ctx_mask, steps=0, lr=0.5, mode="inference")
    assert torch.equal(out.memory, reader.memory.detach().expand(6, -1, -1))
    assert out.losses.shape == (6, 1)


def test_unknown_mode_refused(reader, kv_batch):
    _, batch = kv_batch
    with pytest.raises(ValueError, match="unknown write mode"):
        write_memory(reader, batch.ctx_ids, batch.ctx_mask, 1, 0.5, mode="third_order")


def test_compiled_inference_writes_match_eager():
    reader = make_reader("llama", layers=1).freeze()
    from gradmem.data import collate

    batch = collate([ex for n in (1, 3, 5) for ex in KVTask(n).examples(1, seed=n)], reader.tokenizer)
    eager = write_memory(reader, batch.ctx_ids, batch.ctx_mask, steps=2, lr=0.5, mode="inference")
    # an adaptive write whose target one context meets after one step: the batch shrinks mid-write
    target = float(write_memory(reader, batch.ctx_ids, batch.ctx_mask, 1, 0.5, mode="inference").accuracy.max())
    eager_adaptive = write_memory(reader, batch.ctx_ids, batch.ctx_mask, 3, 0.5, mode="inference", target=target)
    assert len(set(eager_adaptive.steps_used.tolist())) > 1, "every context stopped together: not a test"
    keys, fingerprint = list(reader.state_dict()), reader.fingerprint
    reader.compile()
    assert list(reader.state_dict()) == keys and reader.fingerprint == fingerprint  # same reader, same memories
    compiled = write_memory(reader, batch.ctx_ids, batch.ctx_mask, steps=2, lr=0.5, mode="inference")
    assert (compiled.memory - eager.memory).abs().max() < 1e-5
    assert torch.allclose(compiled.losses, eager.losses, atol=1e-5)
    adaptive = write_memory(reader, batch.ctx_ids, batch.ctx_mask, 3, 0.5, mode="inference", target=target)
    assert torch.equal(adaptive.steps_used, eager_adaptive.steps_used)
    assert (adaptive.memory - eager_adaptive.memory).abs().max() < 1e-5
    assert torch.allclose(adaptive.losses, eager_adaptive.losses, atol=1e-5)
    with pytest.raises(ValueError, match="frozen readers"):
        make_reader("llama").compile()


@pytest.mark.slow  # a compile of the step's forward, gradient and double backward: a minute or more here
def test_compiled_write_step_matches_the_plain_step():
    """compile_write_step: the same memories, losses and outer gradients (full second order and the auxiliary
    write loss) as the autograd step, on contexts of different lengths (padding)."""
    reader = make_reader("llama", layers=1).train()  # one layer: the compile is most of this test's time
    from gradmem.data import collate

    batch = collate([ex for n in (1, 3, 5, 6) for ex in KVTask(n).examples(1, seed=n)], reader.tokenizer)

    def run():
        reader.zero_grad(set_to_none=True)
        with attention_path(reader.lm, "sdpa_math"):
            out = write_memory(reader, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="second_order",
                               final_stats=True, keep_last_loss=True)
            read = read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask).loss.mean()
        (read + 0.5 * out.last_step_loss).backward()
        grads = {n: p.grad.clone() for n, p in reader.named_parameters() if p.grad is not None}
        return out, grads

    plain, plain_grads = run()
    keys, fingerprint = list(reader.state_dict()), reader.fingerprint
    reader.compile_write_step()
    assert list(reader.state_dict()) == keys and reader.fingerprint == fingerprint  # nothing compiled is saved
    out, grads = run()
    assert (out.memory - plain.memory).abs().max() < 1e-5
    assert torch.allclose(out.losses, plain.losses, atol=1e-5)
    assert set(grads) == set(plain_grads) and "write_head.weight" in grads
    for name, g in grads.items():
        scale = plain_grads[name].abs().max()
        assert scale > 0, f"{name}: no gradient, a vacuous check"
        assert (g - plain_grads[name]).abs().max() <= 1e-4 * scale + 1e-7, name
