"""Meta-train a GradMem reader.

    python jobs/train.py --config jobs/configs/kv_tiny.yaml --output runs/kv_tiny
    python jobs/train.py --config jobs/configs/kv_n16.yaml --output runs/kv_n16 --max-steps 20000 --resume

In-process, single worker for now (the distributed-training issue moves it onto Ray Train + DeepSpeed with the
same flags). Writes checkpoints under OUTPUT/checkpoints, learning curves to OUTPUT/metrics.jsonl and the final
reader to OUTPUT/reader (load it with ``gradmem.Reader.from_pretrained``).
"""

from __future__ import annotations

import argparse

import _common  # noqa: F401  (sys.path for a checkout)
from _common import setup_logging

from gradmem.train import TrainConfig, Trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
    parser.add_argument("--output", default=None, help="output directory (default runs/<config name>)")
    parser.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = TrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        cfg.optim.max_steps = args.max_steps
    output = args.output or f"runs/{args.config.rsplit('/', 1)[-1].removesuffix('.yaml')}"
    Trainer(cfg, output).fit(resume=args.resume)


if __name__ == "__main__":
    main()
