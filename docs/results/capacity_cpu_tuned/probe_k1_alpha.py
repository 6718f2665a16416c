"""Probe (issue 12): GradMem trained with K = 1 at N = 1 for several alphas, scored on the VALIDATION stream at
K_eval 1-8, with the write loss after each number of steps. Run from the repository root:
    .venv/bin/python docs/results/capacity_cpu_tuned/probe_k1_alpha.py 0.04,0.12,0.5
"""
import json, sys, time
from gradmem.runtime import configure_cpu
configure_cpu(threads=1)
from benchmarks.capacity import CapacityConfig  # gradmem.capacity when the probe ran (before issue 13)
from gradmem.train import Trainer, evaluate
cfg = CapacityConfig.from_yaml("benchmarks/configs/capacity_cpu.yaml")
spec = [s for s in cfg.methods if s.name == "gradmem_k1"][0]
out = {}
for alpha in [float(a) for a in sys.argv[1].split(",")]:
    tc = cfg.with_tuning({spec.name: {"lr": 0.003, "write_lr": alpha}}).cell_config(spec, 1)  # cfg.tuning = ... before issue 13
    t0 = time.time()
    tr = Trainer(tc, f"runs/probe_k1_alpha/a{alpha}")
    tr.fit()
    scores = evaluate(tr.reader, tr.eval_task, 1000, [1, 2, 3, 4, 8], alpha, seed=("eval", 0), batch_size=250)
    out[alpha] = {"steps": tr.step, "stopped": tr.stopped, "em": {k: round(v["em"], 3) for k, v in scores.items()},
                  "write_loss": {k: round(v["write_loss"], 3) for k, v in scores.items()}, "s": round(time.time() - t0)}
    print(alpha, json.dumps(out[alpha]), flush=True)
