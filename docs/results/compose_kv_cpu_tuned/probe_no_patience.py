"""Probe: does GradMem's composition cell leave its ~50% plateau when patience does not stop it?

    cd <a checkout at the commit named in the README> && python docs/results/compose_kv_cpu_tuned/probe_no_patience.py \
        --output runs/probe_gradmem_c1to4 [--steps 6000]

The gradmem / c1to4 cell of benchmarks/configs/compose_kv_cpu.yaml with its sweep's pick (lr 3e-3, alpha 2.0, from
this directory's sweep/gradmem-c1to4.json), no patience, trained for --steps; then the benchmark's own measure()
(teacher-forced composed EM by c = 1..8 on the same held-out documents). Resumable (the Trainer's checkpoints).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.compose import ComposeConfig, measure
from benchmarks.sweep import apply
from gradmem.config import override
from gradmem.runtime import configure_cpu
from gradmem.train import Trainer

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=6000)
    args = parser.parse_args()
    configure_cpu(threads=1)
    cfg = ComposeConfig.from_yaml("benchmarks/configs/compose_kv_cpu.yaml")
    spec = next(s for s in cfg.methods if s.name == "gradmem")
    regime = next(r for r in cfg.regimes if r.name == "c1to4")
    pick = json.loads((HERE / "sweep" / "gradmem-c1to4.json").read_text())["picked"]
    train_cfg = override(apply(cfg.cell_config(spec, regime, tuned=False), pick),
                         {"run.patience": None, "optim.max_steps": args.steps})
    trainer = Trainer(train_cfg, Path(args.output))
    trainer.fit(resume=True)
    by_c = measure(cfg, trainer.reader, train_cfg)
    out = {"pick": pick, "steps": trainer.step, "selected": trainer.best_record(),
           "em_by_c": {c: v["em"] for c, v in by_c.items()}}
    (Path(args.output) / "probe.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
