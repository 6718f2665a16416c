"""Distributed meta-training throughput: 1 vs 2 workers, plain data parallel vs DeepSpeed ZeRO 0/1/2, in one run.

    python -m benchmarks.train                       # on a local Ray (about 4 minutes on 2 CPU cores)
    python -m benchmarks.train --pairs 16 --steps 20 --json train_bench.json
    RAY_ADDRESS=... python -m benchmarks.train --use-gpu --bf16

Each cell trains the paper's key-value reader (4 layers, d = 128, 8 memory vectors, K = 2, second order) for
--steps steps at a global batch of --batch-size and reports steady-state samples/s (the first step is not
timed). Ratios are against the 1-worker plain data-parallel cell. On a 2-core machine, 2 workers cannot go
faster than 2 cores allow: there the ratios show the engines' overhead, on a GPU cluster their scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from benchmarks.common import ROOT, bar_plot, setup_logging
from gradmem.train import TrainConfig
from pipelines.train import DistributedConfig, fit


def cell_config(pairs: int, steps: int, batch: int) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"arch": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512},
        "memory": {"num_memory": 8, "write_steps": 2, "write_lr": 0.04},
        "task": {"pairs": pairs},
        "optim": {"batch_size": batch, "lr": 1e-4, "warmup_steps": 10, "max_steps": steps},
        "run": {"log_every": steps, "eval_every": 0, "save_every": 0},
    })


def ds(stage: int, micro: int, bf16: bool) -> dict:
    config = json.loads((ROOT / f"jobs/configs/ds_zero{stage}.json").read_text())
    config["train_micro_batch_size_per_gpu"] = micro
    config["bf16"] = {"enabled": bf16}
    return config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="write a PNG of the figures here")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
                 log_to_driver=False)
    cfg = cell_config(args.pairs, args.steps, args.batch_size)
    cells = [("1 worker, plain DP", 1, None), ("2 workers, plain DP", 2, None)] + [
        (f"2 workers, ZeRO-{s}", 2, s) for s in (0, 1, 2)]
    storage = tempfile.mkdtemp(prefix="gradmem-bench-")
    results = {}
    for i, (label, workers, stage) in enumerate(cells):
        micro = args.batch_size // workers
        dcfg = DistributedConfig(num_workers=workers, use_gpu=args.use_gpu, storage=storage, name=f"cell{i}",
                                 deepspeed=None if stage is None else ds(stage, micro, args.bf16), threads_per_worker=1)
        result = fit(cfg, dcfg)
        if result.error:
            raise RuntimeError(f"{label}: {result.error}")
        results[label] = result.metrics["samples_per_s"]
        print(f"{label:<22} {results[label]:8.1f} samples/s", flush=True)
    base = results[cells[0][0]]
    print(f"\nmeta-training throughput, key-value N = {args.pairs}, global batch {args.batch_size}, {args.steps} steps")
    print(f"{'cell':<22} {'samples/s':>10} {'vs 1 worker':>12}")
    for label, rate in results.items():
        print(f"{label:<22} {rate:>10.1f} {rate / base:>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pairs": args.pairs, "batch_size": args.batch_size, "steps": args.steps, "samples_per_s": results}, f, indent=2)
    if args.plot:
        bar_plot(args.plot, list(results), list(results.values()), "samples / s",
                 f"meta-training throughput, key-value N = {args.pairs}, global batch {args.batch_size}")
    return results


if __name__ == "__main__":
    main()
