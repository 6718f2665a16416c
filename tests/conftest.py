"""Tiny readers built from config (nothing is downloaded): one Llama, one GPT-2, both on the key-value tokenizer."""

from __future__ import annotations

import pytest
import torch

from gradmem import MemoryConfig, Reader
from gradmem.tasks.kv import KVTask, kv_tokenizer
from gradmem.train import ModelConfig, build_backbone_config

ARCHS = ("llama", "gpt2")

# Tiny models gain nothing from a second OpenMP thread, and two spinning threads on a shared 2-core machine
# (Ray workers, a second process) slow every small op down by an order of magnitude.
torch.set_num_threads(1)


def make_reader(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **memory) -> Reader:
    tokenizer = kv_tokenizer()
    torch.manual_seed(seed)
    backbone = build_backbone_config(
        ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128),
        len(tokenizer), tokenizer,
    )
    defaults = dict(num_memory=4, write_steps=2, write_lr=0.5, max_context_tokens=100, answer_stop=["|"])
    reader = Reader.from_config(backbone, tokenizer, MemoryConfig(**{**defaults, **memory}))
    return reader.to(dtype)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def reader(arch) -> Reader:
    return make_reader(arch)


@pytest.fixture
def kv_batch(reader):
    """Six examples of different lengths (1..6 pairs), so padding matters."""
    examples = [ex for n in range(1, 7) for ex in KVTask(n).examples(1, seed=n)]
    from gradmem.data import collate
    from gradmem.tasks.kv import UNSCORED

    return examples, collate(examples, reader.tokenizer, unscored=UNSCORED)
