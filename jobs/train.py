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
import sys
from pathlib import Path

import _common  # noqa: F401
from _common import ROOT, connect_ray, refusals, setup_logging

from gradmem.config import add_flags, from_flags, override, parse_assignment
from gradmem.train import TrainConfig, build_task
from pipelines.train import DistributedConfig, check_output_dir, fit


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, DistributedConfig, argparse.Namespace]:
    """The training config comes from --config (YAML) with --set overrides; every field of DistributedConfig is a
    flag (``num_workers`` -> ``--num-workers``; defaults live there), the DeepSpeed config a JSON file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (jobs/configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a training config field, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--max-steps", type=int, default=None, help="shorthand for --set optim.max_steps=N")
    parser.add_argument("--deepspeed", default=None, metavar="JSON_FILE",
                        help="DeepSpeed config (jobs/configs/ds_zero*.json); omit for plain data parallel")
    parser.add_argument("--resume", action="store_true", help="continue STORAGE/NAME from its latest checkpoint")
    parser.add_argument("--resume-from", default=None, help="start from this checkpoint directory (local or s3://): "
                        "one of this job's step_* or an in-process Trainer's checkpoints/step_* (same number of "
                        "workers and optimizer format: plain data parallel for the Trainer's)")
    parser.add_argument("--output", default=None, help="export the final reader here (a new or empty directory, "
                        "or a previous export, which is replaced)")
    add_flags(parser, DistributedConfig, skip=("deepspeed",))
    args = parser.parse_args(argv)
    try:
        updates = dict(parse_assignment(text) for text in args.overrides)
        if args.max_steps is not None:
            updates["optim.max_steps"] = args.max_steps
        cfg = override(TrainConfig.from_yaml(args.config), updates)
        try:
            ds_config = json.loads(Path(args.deepspeed).read_text()) if args.deepspeed else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"--deepspeed {args.deepspeed} is not JSON: {exc}") from None
        name = getattr(args, "name", None) or Path(args.config).name.removesuffix(".yaml")
        storage = getattr(args, "storage", None) or str(ROOT / "runs" / "ray")  # the checkout's, from any directory
        dcfg = from_flags(DistributedConfig, args, deepspeed=ds_config, name=name, storage=storage)
    except (OSError, ValueError) as exc:  # fail before a cluster is touched
        parser.error(str(exc))
    return cfg, dcfg, args


def main(argv: list[str] | None = None) -> None:
    cfg, dcfg, args = parse(argv)
    setup_logging()
    with refusals("train"):  # an output or run that exists, a data file the task cannot read: one line, exit 2
        if args.output is not None:
            check_output_dir(args.output)
        if cfg.task.name in ("babi", "squad"):  # read here once, so a malformed file is refused before any worker
            build_task(cfg.task, "train")
        connect_ray()  # RAY_ADDRESS set (ray job submit, or the user): connect; else a local Ray on 127.0.0.1
        result = fit(cfg, dcfg, output=args.output, resume=args.resume, resume_from=args.resume_from)
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        sys.exit(1)
    print(f"done: {dcfg.name}, latest checkpoint {result.checkpoint.path if result.checkpoint else None}")


if __name__ == "__main__":
    main()
