"""Cluster and KubeRay manifests parse, match their schema or structure, and name flags and files that exist."""

import json
import shlex
import sys
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))


def test_ray_up_config_matches_rays_schema():
    config = yaml.safe_load((ROOT / "cluster/gpu-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def _entrypoint_args(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "jobs/train.py"], words
    return words[2:]


def test_rayjob_manifest_is_well_formed_and_its_command_parses():
    import train as train_job

    manifest = yaml.safe_load((ROOT / "cluster/rayjob-train.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["jobId"] and spec["shutdownAfterJobFinishes"] is True
    cfg, dcfg, args = train_job.parse(_entrypoint_args(spec["entrypoint"]))  # every flag exists, the files load
    assert args.resume and dcfg.deepspeed["zero_optimization"]["stage"] in (1, 2) and dcfg.use_gpu
    assert cfg.optim.batch_size >= dcfg.num_workers
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].startswith("rayproject/ray:")
    workers = cluster["workerGroupSpecs"][0]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and workers["replicas"] >= dcfg.num_workers
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_runtime_env_and_deepspeed_configs_parse():
    env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    for path in sorted((ROOT / "jobs/configs").glob("ds_zero*.json")):
        config = json.loads(path.read_text())
        assert config["train_micro_batch_size_per_gpu"] >= 1 and "stage" in config["zero_optimization"]


def test_rayservice_manifest_matches_serves_schema_and_builds_our_config():
    from ray.serve.schema import ServeDeploySchema

    from gradmem.config import from_dict
    from pipelines.serve import ServeConfig

    manifest = yaml.safe_load((ROOT / "cluster/rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, attr = app.import_path.split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    cfg = from_dict(ServeConfig, app.args)  # the args are exactly our config's fields, valid
    from ray.serve.config import AutoscalingConfig

    auto = AutoscalingConfig(**cfg.scaling()["autoscaling_config"])  # the service autoscales, as Serve reads it
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= app.args["gpus_per_replica"]
    assert auto.max_replicas <= workers["maxReplicas"] * gpus / app.args["gpus_per_replica"]
