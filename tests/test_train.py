"""Meta-training: a tiny reader learns to answer from memory; resume continues exactly; attention paths."""

import json

import pytest
import torch

from gradmem.attention import attention_path, check_attention
from gradmem.config import override
from gradmem.read import read_teacher_forced
from gradmem.tasks.kv import KVTask, exact_match
from gradmem.train import TrainConfig, Trainer, meta_step, metric_values
from gradmem.write import write_memory
from conftest import make_reader


def tiny_config(arch: str, write_steps: int, max_steps: int, **optim) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"arch": arch, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256, "max_positions": 128},
        "memory": {"num_memory": 4, "write_steps": write_steps, "write_lr": 0.5},
        "task": {"pairs": 1},
        "optim": {"batch_size": 32, "lr": 2e-3, "warmup_steps": 20, "max_steps": max_steps, **optim},
        "run": {"log_every": 50, "eval_every": 0, "eval_samples": 256, "save_every": 0},
    })


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_reader_answers_from_memory_far_above_no_context(arch, tmp_path):
    gradmem = Trainer(tiny_config(arch, write_steps=2, max_steps=150), tmp_path / "gradmem")
    gradmem.fit()
    no_context = Trainer(tiny_config(arch, write_steps=0, max_steps=150), tmp_path / "no_context")
    no_context.fit()  # K = 0: memory stays M0, so nothing of the context reaches the READ
    em = gradmem.evaluate([2])[2]["em"]
    em_none = no_context.evaluate([0])[0]["em"]
    assert em > 0.8, em  # chance is 1/3844
    assert em_none < 0.05, em_none
    # the exported reader answers greedily, from memory alone
    from gradmem import Reader

    reader = Reader.from_pretrained(tmp_path / "gradmem" / "reader")
    exs = KVTask(1).examples(64, seed=[7, 7])
    answers = reader.answer(reader.write([e.context for e in exs]), [e.query for e in exs], max_new_tokens=4)
    assert sum(exact_match(a, e.target) for a, e in zip(answers, exs)) / len(exs) > 0.8, answers[:8]


def test_resume_continues_exactly(tmp_path):
    cfg = override(tiny_config("llama", write_steps=2, max_steps=6, batch_size=8), {"run.save_every": 2})
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    interrupted = Trainer(cfg, tmp_path / "resumed")
    interrupted.fit(max_steps=4)
    resumed = Trainer(cfg, tmp_path / "resumed")
    resumed.fit(resume=True)
    assert resumed.step == 6
    for (name, a), b in zip(straight.reader.state_dict().items(), resumed.reader.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 6
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000006"]  # keep_checkpoints = 2, no temporary left behind


def test_meta_step_reports_metrics_and_reaches_every_parameter():
    reader = make_reader("llama")
    cfg = tiny_config("llama", 2, 1)
    batch = KVTask(2).batch(8, 0, reader.tokenizer)
    loss, metrics = meta_step(reader, batch, cfg.optim, steps=2, lr=0.5)
    loss.backward()
    assert {"loss", "read_loss", "write_loss_first", "write_loss_last", "em", "token_acc"} <= set(metrics)
    missing = [n for n, p in reader.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == [], missing
    # left where they were computed, read in one copy, as the loop reads them after queueing the backward
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    values = metric_values(metrics)
    assert list(values) == list(metrics) and all(type(v) is float for v in values.values())
    assert values == {k: float(v) for k, v in metrics.items()}
    assert values["loss"] == pytest.approx(float(loss.detach())) and 0.0 <= values["em"] <= 1.0


def test_a_non_finite_outer_loss_stops_training_before_any_weight_changes(tmp_path):
    """The loop reads a step's metrics after queueing its backward; a NaN loss must still stop the run before the
    optimizer step, with the step named."""
    trainer = Trainer(tiny_config("llama", write_steps=2, max_steps=3, batch_size=4), tmp_path / "run")
    with torch.no_grad():
        trainer.reader.memory[0, 0] = float("nan")  # M0 poisoned: every WRITE and so the outer loss is NaN
    before = {n: p.detach().clone() for n, p in trainer.reader.named_parameters()}
    with pytest.raises(FloatingPointError, match="rank 0: non-finite outer loss at step 0"):
        trainer.fit()
    for name, p in trainer.reader.named_parameters():  # NaN where it was poisoned, equal elsewhere
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert not trainer.optimizer.state, "the optimizer stepped"


@pytest.mark.parametrize("path", ["sdpa", "sdpa_flash", "sdpa_efficient", "flash_attention_2"])
def test_second_order_training_refuses_fused_attention(path):
    with pytest.raises(ValueError, match="cannot be used for second-order meta-training"):
        tiny_config("llama", 2, 1, attention=path)
    tiny_config("llama", 2, 1, attention=path, write_mode="first_order")  # first order may use them
    with pytest.raises(ValueError, match="unknown attention path"):
        check_attention("fast_please", second_order=False)


def test_math_paths_agree_on_second_order_gradients():
    reader = make_reader("llama")
    batch = KVTask(2).batch(4, 0, reader.tokenizer)
    grads = {}
    for path in ("eager", "sdpa_math"):
        reader.zero_grad(set_to_none=True)
        with attention_path(reader.lm, path):
            out = write_memory(reader, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="second_order")
            read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask).loss.mean().backward()
        grads[path] = {n: p.grad.clone() for n, p in reader.named_parameters() if p.grad is not None}
    for name, g in grads["eager"].items():
        assert torch.allclose(g, grads["sdpa_math"][name], atol=1e-6, rtol=1e-4), name


def test_config_rejects_typos():
    with pytest.raises(ValueError, match=r"optim\.learning_rate: unknown key"):
        TrainConfig.from_dict({"optim": {"learning_rate": 1e-3}})
    with pytest.raises(ValueError, match=r"optimizer: unknown key"):
        TrainConfig.from_dict({"optimizer": {}})


def test_bf16_autocast_meta_step_keeps_fp32_weights_and_close_gradients():
    """optim.autocast runs the meta-step's products in bf16 over fp32 weights: the loss and the gradients stay
    close to the fp32 ones (bf16 has 8 bits of mantissa), weights and their gradients stay fp32."""
    reader = make_reader("llama")
    batch = KVTask(2).batch(8, 0, reader.tokenizer)
    grads, losses = {}, {}
    for mode in (None, "bfloat16"):
        cfg = tiny_config("llama", 2, 1, autocast=mode)
        reader.zero_grad(set_to_none=True)
        loss, _ = meta_step(reader, batch, cfg.optim, steps=2, lr=0.5)
        loss.backward()
        losses[mode] = float(loss.detach())
        grads[mode] = torch.cat([p.grad.flatten() for p in reader.parameters() if p.grad is not None])
    assert all(p.dtype == torch.float32 for p in reader.parameters())
    assert grads["bfloat16"].dtype == torch.float32 and torch.isfinite(grads["bfloat16"]).all()
    assert abs(losses["bfloat16"] - losses[None]) < 0.05 * losses[None]
    cosine = torch.nn.functional.cosine_similarity(grads["bfloat16"], grads[None], dim=0)
    assert cosine > 0.98, cosine
    assert not torch.equal(grads["bfloat16"], grads[None])  # bf16 really ran
    with pytest.raises(ValueError, match="optim.autocast"):
        tiny_config("llama", 2, 1, autocast="float16")


def test_checkpoint_layout_is_the_shared_one_and_refuses_another_layout(tmp_path):
    """reader/, best/, optimizer_rank0.pt (loaded weights_only), trainer_state.json: the Ray loop's layout too."""
    from gradmem.loop import LocalEngine
    from gradmem.train_checkpoint import load

    cfg = override(tiny_config("llama", write_steps=2, max_steps=4, batch_size=8),
                   {"run.eval_every": 2, "run.eval_samples": 16, "run.stop_at_em": None})
    trainer = Trainer(cfg, tmp_path / "run")
    export = trainer.fit()
    final = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in final.iterdir()) == ["best", "optimizer_rank0.pt", "reader", "trainer_state.json"]
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 1 and state["optimizer_format"] == "torch"
    assert state["best"] == trainer.best_record() and state["best"]["step"] in (2, 4)
    assert json.loads((final / "best" / "best.json").read_text()) == state["best"]
    assert torch.load(final / "optimizer_rank0.pt", weights_only=True)["scheduler"]["last_epoch"] == 4
    assert not (export / "best.json").exists()  # the export is a plain reader directory
    two_ranks = LocalEngine(trainer.reader, cfg.optim, rank=0, world=2)
    with pytest.raises(ValueError, match="written by 1 worker"):
        load(final, two_ranks)


def test_a_run_directory_trains_in_one_process_at_a_time(tmp_path):
    """Two processes resuming one run would interleave checkpoints and logs: while another process holds the run,
    ``fit`` refuses at once, saying so; once it is gone (the OS lock dies with its holder), the run trains."""
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from gradmem.atomic import exclusive\n"
        f"with exclusive({str(run)!r}, 'a test'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="in use by another process"):
            Trainer(tiny_config("llama", write_steps=1, max_steps=2), run).fit()
        assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    Trainer(tiny_config("llama", write_steps=1, max_steps=2), run).fit()  # the holder died: its lock with it
    assert (run / "reader").is_dir()
