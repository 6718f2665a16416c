"""Meta-train a GradMem reader on Ray Train, with DeepSpeed or plain data parallel.

On a cluster (the job's working directory travels with it):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/kv_n16.yaml --num-workers 8 --use-gpu \
        --deepspeed jobs/configs/ds_zero2_bf16.json --storage s3://my-bucket/gradmem --name kv_n16

On this machine (no RAY_ADDRESS: a local Ray is started and stopped by the job):

    python jobs/train.py --config jobs/configs/kv_tiny.yaml --num-workers 2 \
        --deepspeed jobs/configs/ds_zero2.json --max-steps 20 --output runs/kv_tiny/reader

Checkpoints go to STORAGE/NAME (local directory or s3://; --s3-endpoint or AWS_ENDPOINT_URL for S3-compatible
servers). --resume continues the run STORAGE/NAME from its latest checkpoint with the same step, optimizer and
scheduler state; Ray also restarts failed workers from it (--max-failures). --resume-from DIR starts a new run
from any checkpoint of the same layout, an in-process Trainer's RUN/checkpoints/step_* included (with
--num-workers 1 and no --deepspeed). The final reader (the best by validation unless run.select_best is false)
is exported to --output, loadable with gradmem.Reader.from_pretrained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import _common  # noqa: F401
from _common import ROOT, setup_logging

from gradmem.train import TrainConfig
from pipelines.train import DistributedConfig, check_output_dir, fit


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (jobs/configs/*.yaml)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (jobs/configs/ds_zero*.json); "
                        "omit for plain data parallel")
    parser.add_argument("--storage", default=str(ROOT / "runs" / "ray"), help="local directory or s3://bucket/prefix")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--name", default=None, help="run name under --storage (default: the config's name)")
    parser.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps")
    parser.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from")
    parser.add_argument("--resume", action="store_true", help="continue STORAGE/NAME from its latest checkpoint")
    parser.add_argument("--resume-from", default=None, help="start from this checkpoint directory (local or s3://): "
                        "one of this job's step_* or an in-process Trainer's checkpoints/step_* (same number of "
                        "workers and optimizer format: plain data parallel for the Trainer's)")
    parser.add_argument("--output", default=None, help="export the final reader here (a new or empty directory, "
                        "or a previous export, which is replaced)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    setup_logging()
    cfg = TrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        cfg.optim.max_steps = args.max_steps
    ds_config = None
    if args.deepspeed:
        with open(args.deepspeed) as f:
            ds_config = json.load(f)
    name = args.name or os.path.basename(args.config).removesuffix(".yaml")
    dcfg = DistributedConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, deepspeed=ds_config,
                             storage=args.storage, s3_endpoint=args.s3_endpoint, name=name,
                             max_failures=args.max_failures, cpus_per_worker=args.cpus_per_worker)
    cfg.validate()
    dcfg.validate()  # fail before a cluster is touched
    if args.output is not None:
        try:
            check_output_dir(args.output)
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS set (ray job submit, or the user): connect; else start a local Ray on 127.0.0.1
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}} if "RAY_ADDRESS" not in os.environ else None)
    result = fit(cfg, dcfg, output=args.output, resume=args.resume, resume_from=args.resume_from)
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        sys.exit(1)
    print(f"done: {name}, latest checkpoint {result.checkpoint.path if result.checkpoint else None}")


if __name__ == "__main__":
    main()
