"""Probe (issue 12): is single-write RMT's N = 2 plateau (31% validation EM at the swept lr 3e-4) a tuning failure?
The N = 2 cell retrained with other AdamW learning rates, everything else as the capacity cell (curriculum from the
run's N = 1 RMT reader, 4000-step cap, patience 6, best by validation), scored on the VALIDATION stream only.
Run from the repository root with the capacity run's output under runs/capacity_cpu (it reads
runs/capacity_cpu/runs/rmt_k1_N<N-1>/reader and the run's sweep pick); as run for the log beside it (from the run's
worktree at 2829e8e, where the modules were gradmem.capacity and jobs/configs):
    python docs/results/capacity_cpu_tuned/probe_rmt_lr.py rmt_k1 2 0.001,0.0001
    python docs/results/capacity_cpu_tuned/probe_rmt_lr.py rmt_k1 3 0.001
"""
import json, sys, time
from gradmem.runtime import configure_cpu
configure_cpu(threads=1)
from benchmarks.capacity import CapacityConfig
from gradmem.train import Trainer, evaluate
method, pairs, lrs = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")]
base = CapacityConfig.from_yaml("benchmarks/configs/capacity_cpu.yaml")
spec = [s for s in base.methods if s.name == method][0]
picked = json.load(open(f"runs/capacity_cpu/sweep/{method}.json"))["picked"]
for lr in lrs:
    cfg = base.with_tuning({spec.name: {**picked, "lr": lr}})
    tc = cfg.cell_config(spec, pairs, "runs/capacity_cpu")
    t0 = time.time()
    tr = Trainer(tc, f"runs/probe_lr/{method}_N{pairs}_lr{lr}")
    tr.fit()
    k = tc.memory.write_steps
    scores = evaluate(tr.reader, tr.eval_task, 1000, [k], tc.memory.write_lr, seed=("eval", 0), batch_size=250)
    print(json.dumps({"method": method, "N": pairs, "lr": lr, "picked_by_sweep": picked, "steps": tr.step,
                      "stopped": tr.stopped, "best": tr.best_record(), "validation_em_last_reader": round(scores[k]["em"], 4),
                      "wall_s": round(time.time() - t0)}), flush=True)
