"""The reader checkpoint format and the reader fingerprint.

A reader directory is a Hugging Face model directory plus two things:

    config.json          the backbone's config with a "gradmem" section (format version, MemoryConfig, fingerprint)
    model.safetensors    the backbone's weights, written by ``save_pretrained`` (loadable by AutoModelForCausalLM)
    gradmem.safetensors  M0 ("memory"), the write head and the memory projection
    tokenizer.json ...   the tokenizer

Nothing is pickled: weights are safetensors, settings are JSON. The fingerprint is a SHA-256 over every weight
(name, dtype, shape, bytes), the memory structure (and the method, for the baselines), the backbone config
(less fields that only describe how it was saved) and the tokenizer vocabulary; every memory carries it, and a
reader refuses memories whose fingerprint differs from its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from gradmem.config import json_object

FORMAT_VERSION = 1
EXTRA_WEIGHTS = "gradmem.safetensors"
CONFIG_SECTION = "gradmem"

# Backbone config fields that say how a model was saved or run, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", CONFIG_SECTION,
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_commit_hash",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "_experts_implementation",
}
# Memory settings that change what a memory means (defaults for steps/lr are recorded per memory instead).
STRUCTURAL_MEMORY_KEYS = ("num_memory", "mem_proj", "write_head")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def backbone_identity(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config_dict.items() if k not in _VOLATILE_CONFIG_KEYS}


def compute_fingerprint(
    state_dict: Mapping[str, torch.Tensor],
    backbone_config: Mapping[str, Any],
    memory_config: Mapping[str, Any],
    vocab: Mapping[str, int],
) -> str:
    digest = hashlib.sha256()
    memory = {k: memory_config[k] for k in STRUCTURAL_MEMORY_KEYS}
    method = memory_config.get("method", "gradmem")
    if method != "gradmem":  # a baseline's memories mean something else; GradMem fingerprints stay as they were
        memory["method"] = method
    header = {
        "format": FORMAT_VERSION,
        "memory": memory,
        "backbone": backbone_identity(backbone_config),
        "vocab": sorted(vocab.items()),
    }
    digest.update(_canonical(header).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return "gm1-" + digest.hexdigest()[:32]


def is_reader_dir(path: str | os.PathLike) -> bool:
    """True for a reader directory (config.json with a "gradmem" section); False for a plain model directory."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: {config_file} is missing")
    return isinstance(json_object(config_file.read_bytes(), str(config_file)).get(CONFIG_SECTION), dict)


def read_section(path: str | os.PathLike) -> dict[str, Any]:
    """The "gradmem" section of a reader directory's config.json, with a clear error if it is not a reader."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a reader directory: {config_file} is missing")
    section = json_object(config_file.read_bytes(), str(config_file)).get(CONFIG_SECTION)
    if not isinstance(section, dict):
        raise ValueError(
            f"{path} holds a plain language model, not a GradMem reader (no {CONFIG_SECTION!r} section in "
            "config.json); wrap it with Reader(lm, tokenizer, MemoryConfig(...)) and meta-train it first"
        )
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: reader format version {version!r} is not supported (expected {FORMAT_VERSION})")
    return section
