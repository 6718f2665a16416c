"""The method protocol: a new method is one registered object, and the built-in ones give main's numbers.

``golden_methods.json`` holds the numbers of tiny seeded readers (one per method: three training steps, then a
meta-step, a WRITE, greedy answers, reconstruction and an evaluation) computed by the code before the method
objects existed. Regenerate only on purpose: ``python tests/test_methods.py --regenerate``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gradmem import config, methods
from gradmem.data import collate
from gradmem.tasks.kv import UNSCORED, KVTask
from gradmem.train import OptimConfig, evaluate, meta_step, metric_values
from gradmem.write import WriteOutput

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_reader  # noqa: E402

GOLDEN = Path(__file__).parent / "golden_methods.json"
BUILT_IN = ("gradmem", "rmt", "full_context", "no_context")


# ------------------------------------------------------------------------------------------ a toy method
@dataclass(frozen=True)
class MeanContext:
    """One memory row: the mean of the context's token embeddings. Everything a method needs, nothing more."""

    name: str = "mean_context"
    has_memory: bool = False
    second_order: bool = False
    projection_bias: bool = False

    def write(self, cell, ctx_ids, ctx_mask, steps, lr, mode, second_order_steps, final_stats, keep_last_loss):
        with torch.set_grad_enabled(mode != "inference" and torch.is_grad_enabled()):
            tokens = cell.lm.get_input_embeddings()(ctx_ids)  # (B, L, d)
            mask = ctx_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
            memory = ((tokens * mask).sum(1) / mask.sum(1)).unsqueeze(1)  # (B, 1, d)
        batch = ctx_ids.shape[0]
        return WriteOutput(memory=memory, losses=ctx_ids.new_zeros((batch, 0), dtype=torch.float32),
                           accuracy=torch.zeros(batch, device=ctx_ids.device), last_step_loss=None)

    def memory_input(self, cell, memory):
        return memory

    def prefix_lengths(self, memory, n_tokens):
        return methods.full_rows(memory)

    def memory_slots(self, num_memory, max_context_tokens):
        return 1

    def write_overhead(self, num_memory):
        return 1


@pytest.fixture
def registry(monkeypatch):
    """Registrations made in a test are undone after it."""
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
    monkeypatch.setattr(config, "METHODS", config.METHODS)


def test_a_new_method_is_one_registered_object(registry, tmp_path):
    methods.register(MeanContext())
    reader = make_reader("llama", method="mean_context")
    assert reader.method == MeanContext() and reader.max_context_tokens == 100
    exs = KVTask(1).examples(3, seed=[3, 1])
    mem = reader.write([e.context for e in exs])
    assert mem.tensor.shape == (3, 1, reader.d_model)
    assert len(reader.answer(mem, [e.query for e in exs], max_new_tokens=3)) == 3
    # it trains and evaluates through the same meta-step and evaluation as every other method
    batch = KVTask(1).batch(4, [0], reader.tokenizer)
    loss, metrics = meta_step(reader, batch, OptimConfig(attention="sdpa_math", aux_write_loss=0.5), 2, 0.5)
    loss.backward()
    assert reader.lm.get_input_embeddings().weight.grad is not None and reader.memory.grad is None
    assert 0.0 <= evaluate(reader, KVTask(1), 4, [1], 0.5, batch_size=2)[1]["em"] <= 1.0
    reader.save_pretrained(tmp_path)  # the name is saved and loads back
    assert type(reader).from_pretrained(tmp_path).config.method == "mean_context"


def test_registry_refuses_a_second_object_under_a_taken_name_and_unknown_names(registry):
    with pytest.raises(ValueError, match="already registered"):
        methods.register(MeanContext(name="rmt"))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.get("nope")
    assert tuple(methods.REGISTRY) == BUILT_IN == config.METHODS


def test_write_arguments_are_checked_once_whatever_the_method():
    reader = make_reader("llama", method="no_context")
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown write mode"):
        methods.write(reader, ids, torch.ones_like(ids), 1, 0.5, mode="third_order")
    with pytest.raises(ValueError, match="steps must be >= 0"):
        methods.write(reader, ids, torch.ones_like(ids), -1, 0.5, mode="inference")


# ------------------------------------------------------------------------------------------ main's numbers
def numbers(method: str) -> dict:
    """Numbers of a tiny seeded reader of ``method``, through public calls that exist before and after the
    method objects (so the same function computes the golden file and the check)."""
    torch.manual_seed(0)
    reader = make_reader("llama", seed=3, method=method, mem_proj=method in ("gradmem", "rmt")).train()
    optim = OptimConfig(attention="sdpa_math", aux_write_loss=0.5)
    opt = torch.optim.AdamW([p for p in reader.parameters() if p.requires_grad], lr=3e-3)
    for step in range(3):
        loss, _ = meta_step(reader, KVTask(2).batch(4, [5, step], reader.tokenizer), optim, 2, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    exs = [ex for n in range(1, 5) for ex in KVTask(n).examples(1, seed=n)]
    loss, metrics = meta_step(reader, collate(exs, reader.tokenizer, unscored=UNSCORED), optim, 2, 0.5)
    loss.backward()
    grad = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reader.parameters() if p.grad is not None))
    reader.freeze()
    mem = reader.write([e.context for e in exs])
    ids = reader.encode_contexts([e.context for e in exs])
    return {
        "meta_loss": float(loss.detach()), "meta_metrics": metric_values(metrics), "grad_norm": float(grad),
        "memory_sum": float(mem.tensor.double().sum()), "memory_abs": float(mem.tensor.double().abs().sum()),
        "memory_shape": list(mem.tensor.shape), "write_losses": mem.stats.losses.flatten().tolist(),
        "write_acc": mem.stats.accuracy.tolist(),
        "answers": reader.answer(mem, [e.query for e in exs], max_new_tokens=4),
        "recon": reader.reconstruct(mem, ids).tolist() if method != "no_context" else None,  # no rows: no prompt
        "eval": {str(k): v for k, v in evaluate(reader, KVTask(2), 8, [1, 2], 0.5, batch_size=4).items()},
    }


def close(got, want, path="") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert g_eq(got, want), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def g_eq(got: float, want: float) -> bool:
    return (got != got and want != want) or abs(got - want) <= 1e-4 * max(1.0, abs(want))


@pytest.mark.parametrize("method", BUILT_IN)
def test_numbers_are_those_of_the_code_before_the_method_objects(method):
    close(numbers(method), json.loads(GOLDEN.read_text())[method], method)


if __name__ == "__main__" and "--regenerate" in sys.argv:
    torch.set_num_threads(1)
    GOLDEN.write_text(json.dumps({m: numbers(m) for m in BUILT_IN}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
