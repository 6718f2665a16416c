"""Configs are declared once: validated the same way however they are built, flags generated from their fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from gradmem.config import ConfigError, MemoryConfig, add_flags, from_dict, from_flags, override, parse_assignment
from gradmem.train import TrainConfig
from pipelines.compress import CompressConfig
from pipelines.serve import ServeConfig
from pipelines.train import DistributedConfig
from conftest import load_job

ALL = (MemoryConfig, TrainConfig, CompressConfig, ServeConfig, DistributedConfig)


def test_every_way_of_building_a_config_validates_it():
    with pytest.raises(ValueError, match="num_memory"):
        MemoryConfig(num_memory=0)  # keywords
    with pytest.raises(ConfigError, match=r"memory\.num_memory: Input should be greater than or equal to 1 \(got 0\)"):
        TrainConfig.from_dict({"memory": {"num_memory": 0}})  # a YAML mapping: the dotted path is named
    with pytest.raises(ConfigError, match=r"optim\.lr: Input should be greater than or equal to 0"):
        override(TrainConfig(), {"optim.lr": -1.0})  # a changed copy
    with pytest.raises(ConfigError, match=r"task\.name: Input should be 'kv', 'file', 'babi' or 'squad'"):
        TrainConfig.from_dict({"task": {"name": "kvv"}})  # choices are declared
    with pytest.raises(ConfigError, match="default_new_tokens must be <= max_new_tokens"):
        from_dict(ServeConfig, {"reader": "r", "memories": "m", "default_new_tokens": 65})  # cross-field rules
    with pytest.raises(ConfigError, match=r"reader: Field required"):
        from_dict(CompressConfig, {"input": "i", "output": "o"})


def test_unknown_keys_are_refused_at_every_level():
    with pytest.raises(ConfigError, match=r"optim\.learnig_rate: unknown key"):
        TrainConfig.from_dict({"optim": {"learnig_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r"^TrainConfig: optimizer: unknown key"):
        TrainConfig.from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match="cache_sise: unknown key"):
        from_dict(ServeConfig, {"reader": "r", "memories": "m", "cache_sise": 3})
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; known here: \['attention'"):
        override(TrainConfig(), {"optim.lrr": 1.0})
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_dict(["optim"])


def test_configs_are_frozen_and_override_returns_a_new_validated_one():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    changed = override(cfg, {"optim.lr": 3e-4, "run.patience": 2})
    assert (changed.optim.lr, changed.run.patience) == (3e-4, 2)
    assert (cfg.optim.lr, cfg.run.patience) == (1e-4, None)
    assert TrainConfig.from_dict(changed.to_dict()) == changed  # a saved config loads back equal


def test_the_recipe_write_loss_is_resolved_per_task_and_an_explicit_value_wins():
    assert TrainConfig.from_dict({"task": {"name": "kv"}}).optim.aux_write_loss == 0.5
    assert TrainConfig.from_dict({"task": {"name": "babi"}}).optim.aux_write_loss == 0.0
    assert TrainConfig.from_dict({"task": {"name": "babi"}, "optim": {"aux_write_loss": 0.3}}).optim.aux_write_loss == 0.3


def test_assignments_read_values_as_yaml_numbers_included():
    assert parse_assignment("optim.lr=3e-4") == ("optim.lr", 3e-4)  # YAML 1.1 alone would give the string "3e-4"
    assert parse_assignment("run.patience=null") == ("run.patience", None)
    assert parse_assignment("task.tasks=[qa1, qa2]") == ("task.tasks", ["qa1", "qa2"])
    assert parse_assignment("model.pretrained=runs/x") == ("model.pretrained", "runs/x")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignment("optim.lr")


def test_yaml_that_is_not_plain_data_is_one_clear_error_and_runs_nothing(tmp_path):
    """yaml.safe_load never builds an object from a python/* tag; such YAML, YAML that does not parse, and YAML that
    is not a mapping are a ValueError naming the file or the --set key (jobs print it in one line)."""
    marker = tmp_path / "ran"
    cases = {"tag.yaml": f"optim: !!python/object/apply:os.system ['touch {marker}']\n",
             "syntax.yaml": "optim: [1\n", "tab.yaml": "optim:\n\tlr: 1\n", "list.yaml": "- 1\n- 2\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            TrainConfig.from_yaml(str(tmp_path / name))
    for value in (f"!!python/object/apply:os.system ['touch {marker}']", "[1", "!!python/name:os.system"):
        with pytest.raises(ValueError, match="--set optim.lr"):
            parse_assignment(f"optim.lr={value}")
    assert not marker.exists()


@pytest.mark.parametrize("cls", [CompressConfig, ServeConfig, DistributedConfig, MemoryConfig])
def test_every_field_is_a_flag_and_left_out_flags_keep_the_declared_defaults(cls):
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    flags = {a.dest for a in parser._actions}
    assert set(cls.__pydantic_fields__) <= flags
    required = [f"--{name.replace('_', '-')}=x" for name, f in cls.__pydantic_fields__.items() if f.is_required()]
    assert from_flags(cls, parser.parse_args(required)) == from_dict(cls, {a[2:].split("=")[0].replace("-", "_"): "x"
                                                                           for a in required})


def test_serve_job_sets_every_service_setting_from_the_command_line():
    serve_job = load_job("serve")
    cfg, args = serve_job.parse(["--reader", "r", "--memories", "m", "--cache-size", "7", "--max-questions", "3",
                                 "--cache-bytes", "1000", "--refresh-interval-s", "0.5", "--port", "9000"])
    assert (cfg.cache_size, cfg.max_questions, cfg.cache_bytes, cfg.refresh_interval_s) == (7, 3, 1000, 0.5)
    assert cfg.max_batch_size == ServeConfig.__pydantic_fields__["max_batch_size"].default and args.port == 9000
    with pytest.raises(SystemExit):  # the key's digest is derived from the key, never given on a command line
        serve_job.parse(["--reader", "r", "--memories", "m", "--api-key-sha256", "sha256:00:00"])
    with pytest.raises(SystemExit):
        serve_job.parse(["--reader", "r", "--memories", "m", "--cache-size", "0"])


def test_compress_job_flags_cover_the_config_with_booleans_both_ways():
    compress_job = load_job("compress")
    base = ["--reader", "r", "--input", "i", "--output", "o"]
    cfg = compress_job.parse(base + ["--no-greedy-check", "--chunk", "--batches-per-call", "2", "--lr", "0.1"])
    assert (cfg.greedy_check, cfg.chunk, cfg.batches_per_call, cfg.lr, cfg.steps) == (False, True, 2, 0.1, None)
    assert compress_job.parse(base) == CompressConfig(reader="r", input="i", output="o")
    with pytest.raises(SystemExit):
        compress_job.parse(base + ["--actors", "0"])


def test_train_job_overrides_the_yaml_and_builds_the_distributed_config(tmp_path):
    train_job = load_job("train")
    cfg, dcfg, _ = train_job.parse(["--config", "jobs/configs/kv_tiny.yaml", "--set", "optim.lr=3e-4",
                                    "--set", "run.patience=3", "--max-steps", "7", "--num-workers", "3",
                                    "--deepspeed", "jobs/configs/ds_zero2.json"])
    assert (cfg.optim.lr, cfg.run.patience, cfg.optim.max_steps) == (3e-4, 3, 7)
    assert (dcfg.num_workers, dcfg.name, dcfg.deepspeed["zero_optimization"]["stage"]) == (3, "kv_tiny", 2)
    zero3 = tmp_path / "z3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    for bad in (["--set", "optim.lrr=1"], ["--deepspeed", str(zero3)], ["--set", "optim.lr"]):
        with pytest.raises(SystemExit):
            train_job.parse(["--config", "jobs/configs/kv_tiny.yaml", *bad])


def test_serve_replicas_are_fixed_unless_max_replicas_asks_for_autoscaling():
    from ray.serve.config import AutoscalingConfig

    base = {"reader": "r", "memories": "m"}
    assert from_dict(ServeConfig, {**base, "replicas": 3}).scaling() == {"num_replicas": 3}  # today's behaviour
    auto = from_dict(ServeConfig, {**base, "replicas": 2, "max_replicas": 6, "target_ongoing_requests": 8}).scaling()
    assert auto == {"autoscaling_config": {"min_replicas": 2, "max_replicas": 6, "initial_replicas": 2,
                                           "target_ongoing_requests": 8.0}}
    AutoscalingConfig(**auto["autoscaling_config"])  # as Ray Serve reads it
    scale_to_zero = from_dict(ServeConfig, {**base, "min_replicas": 0, "max_replicas": 2}).scaling()
    assert scale_to_zero["autoscaling_config"]["min_replicas"] == 0
    with pytest.raises(ConfigError, match="autoscaling settings: set max_replicas"):
        from_dict(ServeConfig, {**base, "min_replicas": 2})
    with pytest.raises(ConfigError, match="autoscaling settings: set max_replicas"):
        from_dict(ServeConfig, {**base, "target_ongoing_requests": 4})
    with pytest.raises(ConfigError, match=r"replicas \(5, the starting count\) must lie within"):
        from_dict(ServeConfig, {**base, "replicas": 5, "max_replicas": 4})
    with pytest.raises(ConfigError, match="must lie within min_replicas"):
        from_dict(ServeConfig, {**base, "min_replicas": 3, "max_replicas": 2, "replicas": 2})


@pytest.mark.parametrize("ds_config", [{"zero_optimization": "yes"}, {"zero_optimization": {"stage": [3]}},
                                       {"zero_optimization": {"stage": True}}, {"zero_optimization": {"stage": "two"}}])
def test_a_deepspeed_config_of_the_wrong_types_is_a_config_error_not_a_traceback(ds_config):
    """Before, ``zero_stage`` raised AttributeError / TypeError inside the validator: jobs/train.py printed a
    traceback instead of its one-line refusal."""
    with pytest.raises(ValueError, match=r"zero_optimization(\.stage)? must be"):  # the new messages only
        DistributedConfig(deepspeed=ds_config)
    assert DistributedConfig(deepspeed={"zero_optimization": {"stage": 2}}).deepspeed["zero_optimization"]["stage"] == 2


def test_a_worker_s_device_is_the_one_it_reserved_never_one_it_merely_sees():
    """Writer actors and service replicas put their reader where their GPU reservation says (Ray leaves a GPU
    visible to actors that reserve none); a reservation that no CUDA device backs is one clear error."""
    import torch

    from gradmem.runtime import reserved_device

    assert reserved_device(0) == "cpu" and reserved_device(0.0) == "cpu"
    if torch.cuda.is_available():
        assert reserved_device(0.5) == "cuda"
    else:
        with pytest.raises(RuntimeError, match="reserved 0.5 GPU.*sees no CUDA device"):
            reserved_device(0.5)
