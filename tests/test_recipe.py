"""The authors' recipe and fair comparisons (issue 12): defaults, RMT's projection, model selection on validation,
the per-method sweep, the curriculum warm start, and what each shipped config claims in its header."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.capacity import CapacityConfig, cell_name, run_capacity
from benchmarks.compare import CompareConfig
from benchmarks.compose import ComposeConfig
from benchmarks.sweep import SweepConfig, fmt, pick
from gradmem import Reader, methods
from gradmem.train import TrainConfig, Trainer, build_reader
from conftest import make_reader, markdown_rows

ROOT = Path(__file__).resolve().parents[1]
# every shipped YAML by name: the training configs users run (jobs/) and the experiments' grids (benchmarks/)
CONFIGS = {p.name: p for folder in ("jobs", "benchmarks") for p in (ROOT / folder / "configs").glob("*.yaml")}


def tiny(**sections) -> TrainConfig:
    data = {
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_positions": 128},
        "memory": {"num_memory": 2, "write_steps": 1, "write_lr": 0.5},
        "task": {"pairs": 1},
        "optim": {"batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "max_steps": 6},
        "run": {"log_every": 2, "eval_every": 2, "eval_samples": 16, "eval_batch_size": 16, "save_every": 0},
    }
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return TrainConfig.from_dict(data)


def state(reader: Reader) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in reader.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ the recipe's defaults
def test_key_value_backbone_is_the_authors():
    reader = build_reader(tiny())
    lm = reader.lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # tied
    rope = lm.config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 5e5 and rope["factor"] == 32.0
    assert rope["original_max_position_embeddings"] == 8192
    assert lm.config.rms_norm_eps == 1e-5
    assert reader.write_head is not None and reader.write_head.weight is not lm.get_input_embeddings().weight


@pytest.mark.parametrize("task, weight", [("kv", 0.5), ("babi", 0.0), ("squad", 0.0)])
def test_auxiliary_write_loss_only_where_the_recipe_has_it(task, weight):
    assert TrainConfig.from_dict({"task": {"name": task}}).optim.aux_write_loss == weight
    assert TrainConfig.from_dict({"task": {"name": task}, "optim": {"aux_write_loss": 0.25}}).optim.aux_write_loss == 0.25


def test_rmt_projection_is_a_biased_linear_applied_at_write_not_at_read():
    reader = make_reader("llama", method="rmt", mem_proj=True, write_steps=1)
    proj = reader.mem_proj
    assert proj is not None and proj.bias is not None
    assert not torch.allclose(proj.weight, torch.eye(proj.weight.shape[0]))  # default init, not identity
    memory = torch.randn(3, reader.num_memory, reader.d_model)
    prefix, _ = methods.read_prefix(reader, memory)
    assert torch.equal(prefix, memory)  # READ sees the memory as written
    ids = reader.tokenizer(["!ab:cd!|"], return_tensors="pt")["input_ids"]
    lengths = torch.tensor([ids.shape[1]])
    out = methods.rmt_pass(reader, memory[:1], ids, lengths)
    m = reader.num_memory
    embeds = torch.cat([memory[:1], reader.lm.get_input_embeddings()(ids), memory[:1]], dim=1)
    hidden = reader.last_hidden(embeds)[:, m + ids.shape[1]:]  # the trailing slots
    assert torch.allclose(out, proj(hidden), atol=1e-6)
    # GradMem keeps its identity-initialised preconditioner, used at READ
    gm = make_reader("llama", method="gradmem", mem_proj=True)
    assert gm.mem_proj.bias is None and torch.equal(gm.mem_proj.weight, torch.eye(gm.d_model))


# ------------------------------------------------------------------------------------------ model selection
def test_export_restores_the_best_validation_step_not_the_last(tmp_path):
    trainer = Trainer(tiny(), tmp_path / "run")
    trainer.output.mkdir(parents=True)
    trainer.step = 4
    assert trainer.keep_if_best({"em": 0.5, "token_acc": 0.6})
    best_weights = state(trainer.reader)
    with torch.no_grad():
        trainer.reader.memory.add_(1.0)  # the weights move on after the best evaluation
    trainer.step = 6
    assert not trainer.keep_if_best({"em": 0.5, "token_acc": 0.55})  # worse: not kept
    assert trainer.best_record() == {"step": 4, "em": 0.5, "token_acc": 0.6}
    export = trainer.fit(max_steps=6)  # nothing left to train: export
    assert same_weights(state(Reader.from_pretrained(export)), best_weights)


def test_select_best_off_exports_the_last_step(tmp_path):
    trainer = Trainer(tiny(run={"select_best": False}), tmp_path / "run")
    trainer.output.mkdir(parents=True)
    trainer.keep_if_best({"em": 1.0, "token_acc": 1.0})
    with torch.no_grad():
        trainer.reader.memory.add_(1.0)
    last = state(trainer.reader)
    assert same_weights(state(Reader.from_pretrained(trainer.fit(max_steps=0))), last)


def test_patience_stops_when_validation_no_longer_improves(tmp_path):
    # lr 0: the weights never move, so the second evaluation equals the first and is no improvement
    cfg = tiny(optim={"lr": 0.0, "max_steps": 100}, run={"patience": 1, "stop_at_em": None})
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    assert trainer.step == 4 and trainer.stopped.startswith("no better validation EM for 1 evaluations")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4]
    assert events[-1]["event"] == "stop"
    again = Trainer(cfg, tmp_path / "run")  # a resume does not train past the stop
    again.fit(resume=True)
    assert again.step == 4


def test_stop_at_em_and_the_wall_time_cap(tmp_path):
    reached = Trainer(tiny(optim={"max_steps": 100}, run={"stop_at_em": 0.0}), tmp_path / "em")
    reached.fit()
    assert reached.step == 2 and "reached stop_at_em" in reached.stopped
    capped = Trainer(tiny(optim={"max_steps": 100}, run={"max_seconds": 1e-9, "eval_every": 50}), tmp_path / "cap")
    capped.fit()
    assert capped.step == 1 and "wall-time cap" in capped.stopped
    assert capped.best_record()["step"] == 1  # evaluated when it stopped, so the selection sees the last state


# ------------------------------------------------------------------------------------------ the sweep
def test_sweep_picks_on_validation_even_where_test_would_pick_otherwise():
    trials = [
        {"candidate": {"lr": 1e-3}, "validation": {"em": 0.40, "token_acc": 0.7, "step": 5}, "test": {"em": 0.90}},
        {"candidate": {"lr": 3e-3}, "validation": {"em": 0.60, "token_acc": 0.6, "step": 5}, "test": {"em": 0.10}},
        {"candidate": {"lr": 1e-2}, "validation": {"em": 0.60, "token_acc": 0.5, "step": 5}, "test": {"em": 0.95}},
    ]
    assert pick(trials)["candidate"] == {"lr": 3e-3}  # best validation EM, then token accuracy; never test
    tie = [dict(trials[1]), dict(trials[1], candidate={"lr": 5e-3})]
    assert pick(tie)["candidate"] == {"lr": 3e-3}  # exact ties go to the earlier candidate
    sooner = [dict(trials[1]), {"candidate": {"lr": 5e-3}, "validation": {"em": 0.60, "token_acc": 0.6, "step": 3}}]
    assert pick(sooner)["candidate"] == {"lr": 5e-3}  # equal scores: the one that got there first
    with pytest.raises(ValueError, match="no sweep trial"):
        pick([{"candidate": {}, "validation": None}])


def test_sweep_candidates_are_equal_across_methods_with_alpha_for_gradmem_only():
    sweep = SweepConfig.from_dict({"lr": [1e-3, 3e-3], "write_lr": [0.5, 2.0], "max_steps": 10})
    assert len(sweep.candidates("gradmem")) == 4
    assert sweep.candidates("rmt") == sweep.candidates("full_context") == [{"lr": 1e-3}, {"lr": 3e-3}]
    for bad, message in [({"lr": [0]}, r"lr\.0: Input should be greater than 0"),
                         ({"lr": [1e-3], "steps": 3}, r"steps: unknown key \(a typo\?\)"),
                         ({"lr": [], "write_lr": []}, "needs candidates"),
                         ({"lr": [1e-3], "max_steps": 0}, r"max_steps: Input should be greater than or equal to 1")]:
        with pytest.raises(ValueError, match=message):
            SweepConfig.from_dict(bad)


def smoke_grid(tmp_path: Path, **extra) -> Path:
    data = yaml.safe_load((CONFIGS["capacity_smoke.yaml"]).read_text())
    data["run"] = {**data["run"], "eval_every": 5, "eval_samples": 16}
    data["optim"] = {**data["optim"], "max_steps": 10}
    data.update(extra)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_capacity_job_trains_each_method_with_its_validation_pick(tmp_path):
    cfg = CapacityConfig.from_yaml(smoke_grid(tmp_path, pairs=[1], sweep={"lr": [0.003, 0.0003], "write_lr": [0.5, 1.0],
                                                                         "max_steps": 6}))
    out = tmp_path / "out"
    summary = run_capacity(cfg, out, device="cpu")
    assert set(summary["sweep"]) == {s.name for s in cfg.methods}
    for spec in cfg.methods:
        record = json.loads((out / "sweep" / f"{spec.name}.json").read_text())
        assert len(record["trials"]) == (4 if spec.method == "gradmem" else 2)
        assert record["picked"] == pick(record["trials"])["candidate"]
        trained = yaml.safe_load((out / "runs" / f"{spec.name}_N1" / "config.yaml").read_text())
        assert trained["optim"]["lr"] == record["picked"]["lr"]
        if spec.method == "gradmem":
            assert trained["memory"]["write_lr"] == record["picked"]["write_lr"]
        # a trial only ever evaluates on validation: its log has eval events and nothing else scored
        log = (out / "sweep_runs" / f"{spec.name}_1" / "metrics.jsonl").read_text().splitlines()
        assert {json.loads(line)["event"] for line in log} <= {"train", "eval", "stop"}
    rows = markdown_rows((out / "results.md").read_text(), "| method | tried")  # the sweep table: what each method picked
    for spec in cfg.methods:
        record = json.loads((out / "sweep" / f"{spec.name}.json").read_text())
        assert rows[spec.name]["picked"] == fmt(record["picked"])


def test_capacity_configs_refuse_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match=r"curriculumm: unknown key \(a typo\?\)"):
        CapacityConfig.from_yaml(smoke_grid(tmp_path, curriculumm=True))
    with pytest.raises(ValueError, match=r"sweep\.lrs: unknown key \(a typo\?\)"):
        CapacityConfig.from_yaml(smoke_grid(tmp_path, sweep={"lrs": [1e-3]}))
    with pytest.raises(ValueError, match=r"run\.patients: unknown key"):
        TrainConfig.from_dict({"run": {"patients": 3}})


# ------------------------------------------------------------------------------------------ the curriculum
def test_curriculum_warm_starts_every_method_from_its_smaller_n_reader(tmp_path):
    cfg = CapacityConfig.from_yaml(smoke_grid(tmp_path, curriculum=True))
    out = tmp_path / "out"
    for spec in cfg.methods:
        small = cfg.cell_config(spec, 1, out)
        assert small.model.warm_start is None
        Trainer(small, out / "runs" / cell_name(spec, 1)).fit()
        large = cfg.cell_config(spec, 2, out)
        assert large.model.warm_start == str(out / "runs" / cell_name(spec, 1) / "reader")
        assert large.task.pairs == 2
        started = Trainer(large, tmp_path / "probe" / spec.name)  # the N = 2 cell before its first step
        source = Reader.from_pretrained(large.model.warm_start)
        assert same_weights(state(started.reader), state(source)), spec.name
        fresh = Trainer(cfg.cell_config(spec, 1, out), tmp_path / "fresh" / spec.name)
        assert not same_weights(state(fresh.reader), state(source)), spec.name  # training moved the N = 1 weights


def test_a_warm_start_of_another_structure_fails_clearly(tmp_path):
    source = tiny(memory={"num_memory": 3})
    Trainer(source, tmp_path / "src").fit(max_steps=0)
    with pytest.raises(ValueError, match="do not fit this config's reader"):
        build_reader(tiny(model={"warm_start": str(tmp_path / "src" / "reader")}))


# ------------------------------------------------------------------------------------------ shipped configs
# What each shipped training config's header claims, checked against the values it resolves to. Keys are dotted
# paths into the resolved TrainConfig of every method (``methods.<name>.<path>`` for one method).
AUTHORS_KV = {"model.tie_embeddings": True, "model.rope_theta": 5e5, "model.rope_scaling": "llama3",
              "model.norm_eps": 1e-5, "model.dtype": "float32", "memory.num_memory": 8, "memory.write_head": True,
              "optim.grad_clip": 1.0, "optim.write_mode": "second_order", "task.name": "kv"}
CLAIMS: dict[str, dict[str, object]] = {
    "numerics_kv_cpu.yaml": {**AUTHORS_KV, "model.num_layers": 4, "model.hidden_size": 128, "memory.num_memory": 8,
                             "memory.write_steps": 2, "memory.write_lr": 0.5, "optim.batch_size": 64, "optim.lr": 1e-3,
                             "optim.warmup_steps": 50, "optim.max_steps": 400, "optim.aux_write_loss": 0.5,
                             "optim.write_mode": "second_order", "optim.autocast": None, "optim.compile_write": False,
                             "run.stop_at_em": None, "task.pairs": 2},
    "kv_n8.yaml": {**AUTHORS_KV, "model.num_layers": 4, "model.hidden_size": 128, "model.intermediate_size": 512,
                   "memory.write_steps": 2, "memory.write_lr": 0.04, "memory.mem_proj": False, "optim.batch_size": 64,
                   "optim.lr": 1e-4, "optim.warmup_steps": 10000, "optim.aux_write_loss": 0.5, "task.pairs": 8},
    "kv_n16.yaml": {**AUTHORS_KV, "model.num_layers": 4, "model.hidden_size": 128, "memory.write_steps": 2,
                    "memory.write_lr": 0.04, "optim.lr": 1e-4, "optim.warmup_steps": 10000, "optim.aux_write_loss": 0.5,
                    "task.pairs": 16},
    "kv_n32.yaml": {**AUTHORS_KV, "model.num_layers": 4, "model.hidden_size": 128, "memory.write_steps": 2,
                    "memory.write_lr": 0.12, "optim.lr": 1e-4, "optim.warmup_steps": 10000, "optim.aux_write_loss": 0.5,
                    "task.pairs": 32},
    "capacity_paper_gpu.yaml": {**AUTHORS_KV, "model.num_layers": 4, "model.hidden_size": 128, "optim.batch_size": 64,
                                "optim.lr": 1e-4, "optim.warmup_steps": 10000, "optim.aux_write_loss": 0.5,
                                "methods.rmt_k1.memory.write_steps": 1, "methods.rmt_k1.memory.mem_proj": True,
                                "methods.gradmem_k2.memory.mem_proj": False},
    "capacity_gpu_check.yaml": {**AUTHORS_KV, "model.num_layers": 4, "model.hidden_size": 128, "optim.batch_size": 64,
                                "optim.lr": 1e-3, "optim.warmup_steps": 500, "run.max_seconds": 330, "task.pairs": 16,
                                "methods.rmt_k1.memory.write_steps": 1, "methods.rmt_k1.memory.mem_proj": True,
                                "methods.gradmem_k1_a0.04.memory.write_lr": 0.04,
                                "methods.gradmem_k1_a0.12.memory.write_lr": 0.12},
    "capacity_cpu.yaml": {**AUTHORS_KV, "model.num_layers": 2, "model.hidden_size": 64, "optim.batch_size": 32,
                          "optim.warmup_steps": 200, "optim.max_steps": 4000, "run.patience": 6, "run.stop_at_em": 1.0,
                          "methods.rmt_k1.memory.write_steps": 1, "methods.rmt_k1.memory.mem_proj": True,
                          "methods.rmt_repeat_k2.memory.write_steps": 2, "methods.gradmem_k2.memory.mem_proj": False},
    "capacity_n2_cpu.yaml": {**AUTHORS_KV, "model.num_layers": 2, "model.hidden_size": 64, "optim.batch_size": 32,
                             "optim.warmup_steps": 200, "optim.max_steps": 8000, "run.patience": 8,
                             "methods.rmt_k1.memory.write_steps": 1, "methods.rmt_k1.memory.mem_proj": True,
                             "methods.gradmem_k2.memory.write_steps": 2, "methods.gradmem_k2.memory.mem_proj": False},
    "babi_qa1_gpu.yaml": {"memory.num_memory": 8, "memory.mem_proj": True, "optim.batch_size": 64, "optim.lr": 1e-4,
                          "optim.aux_write_loss": 0.0, "optim.autocast": "bfloat16", "task.name": "babi",
                          "methods.gradmem.memory.write_steps": 2, "methods.rmt.memory.write_steps": 1,
                          "methods.rmt_repeat_k2.memory.write_steps": 2},
    "babi_gpu.yaml": {"memory.num_memory": 8, "memory.mem_proj": True, "optim.batch_size": 64, "optim.lr": 1e-4,
                      "optim.aux_write_loss": 0.0, "methods.gradmem.memory.write_steps": 2,
                      "methods.rmt.memory.write_steps": 1},
    "babi_qa1_cpu.yaml": {"memory.num_memory": 8, "optim.aux_write_loss": 0.0, "task.name": "babi", "run.patience": 6,
                          "methods.gradmem.memory.write_steps": 2, "methods.rmt.memory.write_steps": 1,
                          "methods.rmt.memory.mem_proj": True, "methods.rmt_repeat_k2.memory.write_steps": 2},
    "squad_cqa_gpu.yaml": {"memory.num_memory": 8, "memory.mem_proj": True, "optim.aux_write_loss": 0.0,
                           "task.variant": "c_qa", "methods.gradmem.memory.write_steps": 2,
                           "methods.rmt.memory.write_steps": 1},
    "squad_cqa_cpu.yaml": {"optim.aux_write_loss": 0.0, "methods.gradmem.memory.write_lr": 16.0,
                           "methods.rmt.memory.write_steps": 1},
    # composition (issue 15): ``methods.<method>@<regime>`` for one cell
    "compose_kv_cpu.yaml": {"task.name": "kv", "task.pairs": 1, "model.num_layers": 2, "model.hidden_size": 64,
                            "model.max_positions": 128, "memory.num_memory": 4, "memory.write_lr": 0.5, "optim.lr": 1e-3, "optim.batch_size": 32, "optim.max_steps": 8000,
                            "run.patience": 8, "methods.gradmem@c1.task.chunks": [1, 1],
                            "methods.gradmem@c1to4.task.chunks": [1, 4], "methods.rmt@c1to4.task.chunks": [1, 4],
                            "methods.rmt@c1.memory.write_steps": 1, "methods.gradmem@c1.memory.write_steps": 2,
                            "methods.rmt@c1to4.memory.mem_proj": True, "methods.gradmem@c1.memory.mem_proj": False,
                            "model.tie_embeddings": True, "optim.aux_write_loss": 0.5},
    "compose_babi_qa1_cpu.yaml": {"task.name": "babi", "model.num_layers": 2, "model.hidden_size": 64,
                                  "model.max_positions": 512, "memory.num_memory": 8, "memory.mem_proj": True,
                                  "optim.aux_write_loss": 0.0, "optim.lr": 3e-4, "memory.write_lr": 0.5,
                                  "optim.max_steps": 3000,
                                  "run.patience": 6, "methods.rmt@c1.memory.write_steps": 1,
                                  "methods.gradmem@c1to4.memory.write_steps": 2,
                                  "methods.gradmem@c1to4.task.chunks": [1, 4]},
}


def resolved_methods(path: Path) -> dict[str, TrainConfig]:
    data = yaml.safe_load(path.read_text())
    if "methods" not in data:
        return {"": TrainConfig.from_dict(data)}
    if "pairs" in data:
        cfg = CapacityConfig.from_dict(data)
        return {s.name: cfg.cell_config(s, cfg.pairs[-1]) for s in cfg.methods}
    if "regimes" in data:
        cfg = ComposeConfig.from_dict(data)
        return {f"{s.name}@{r.name}": cfg.cell_config(s, r) for s, r in cfg.cells()}
    cfg = CompareConfig.from_dict(data)
    return {s.name: cfg.cell_config(s) for s in cfg.methods}


def lookup(cfg: TrainConfig, dotted: str):
    section, name = dotted.split(".", 1)
    return getattr(getattr(cfg, section), name)


def split_claims(claims: dict[str, object]) -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    """Claims about every method, and per method (``methods.<name>.<section>.<field>``; names may hold dots)."""
    common, per_method = {}, {}
    for key, value in claims.items():
        if key.startswith("methods."):
            method, section, field = key[len("methods."):].rsplit(".", 2)
            per_method.setdefault(method, {})[f"{section}.{field}"] = value
        else:
            common[key] = value
    return common, per_method


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_each_shipped_config_resolves_to_what_its_header_claims(name):
    path = CONFIGS[name]
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "the paper's settings" not in header.lower()  # a config says what it keeps and what it changes
    assert "DEVIATIONS" in header  # what differs from the authors' recipe is named
    resolved = resolved_methods(path)
    common, per_method = split_claims(CLAIMS[name])
    for method, cfg in resolved.items():
        for key, expected in {**common, **per_method.get(method, {})}.items():
            assert lookup(cfg, key) == expected, (name, method, key)
    assert set(per_method) <= set(resolved), (name, sorted(resolved))


def test_every_shipped_training_config_has_its_claims_checked():
    trained = set(CONFIGS) - {"capacity_smoke.yaml", "compare_smoke.yaml", "compose_smoke.yaml"}
    unchecked = sorted(trained - set(CLAIMS) - {"kv_demo.yaml", "kv_tiny.yaml", "babi_qa1_smollm2_cpu.yaml"})
    assert not unchecked, f"configs whose header claims nobody checks: {unchecked}"
    for name in ("kv_demo.yaml", "kv_tiny.yaml", "babi_qa1_smollm2_cpu.yaml"):  # the small ones name no recipe
        assert "DEVIATIONS" in CONFIGS[name].read_text() or "recipe" not in CONFIGS[name].read_text()


def test_compile_write_compiles_the_write_step_of_the_reader_both_loops_build():
    """optim.compile_write reaches build_reader (the in-process and the Ray Train loop's reader); the compiled
    step itself is checked against the plain one in test_write."""
    assert build_reader(tiny()).compiled_write_gradient is None
    reader = build_reader(tiny(optim={"compile_write": True}))
    assert reader.compiled_write_gradient is not None
    assert all(not k.startswith("_compiled") for k in reader.state_dict())
