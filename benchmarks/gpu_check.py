"""The most informative paper cell one GPU can run in about 8 minutes: key-value N = 16, 8 memory vectors of 128.

    python -m benchmarks.gpu_check              # benchmarks/configs/capacity_gpu_check.yaml -> runs/gpu_check
    python -m benchmarks.gpu_check --output docs/results/gpu_check   # where the committed results live

Every method of the config (GradMem K = 1 at two alphas, single-write RMT, the full-context bound) trains at once,
one process per method on the same GPU: each is a ~1M-parameter model whose steps are bound by kernel launches,
so several processes fill the card better than one. Each cell trains under the config's wall-time cap
(``run.max_seconds``), keeps its best reader by validation EM, and is then scored on held-out test samples at
every K_eval. The results (results.md with the paper's figures beside ours, results.json, capacity.png) are those
of ``benchmarks.capacity``, which this script runs; the per-method logs go to OUTPUT/logs/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.capacity import CapacityConfig
from benchmarks.common import ROOT, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "benchmarks/configs/capacity_gpu_check.yaml"))
    parser.add_argument("--output", default=str(ROOT / "runs/gpu_check"))
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (a slow smoke run)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = CapacityConfig.from_yaml(args.config)
    output = Path(args.output).resolve()  # the cells run from the repository root (python -m benchmarks...)
    (output / "logs").mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "benchmarks.capacity", "--config", str(Path(args.config).resolve()), "--output", str(output)]
    if args.device:
        base += ["--device", args.device]

    started = time.perf_counter()
    procs = {}
    for spec in cfg.methods:  # one process per method, all at once
        log = open(output / "logs" / f"{spec.name}.log", "w")
        proc = subprocess.Popen(base + ["--only", spec.name], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        procs[spec.name] = (proc, log)
    print(f"gpu_check: {len(procs)} methods training in parallel ({', '.join(procs)}); logs in {output / 'logs'}",
          flush=True)
    failed = []
    while procs:
        for name, (proc, log) in list(procs.items()):
            if proc.poll() is not None:
                log.close()
                del procs[name]
                print(f"gpu_check: {name} finished (exit {proc.returncode}) after {time.perf_counter() - started:.0f} s",
                      flush=True)
                if proc.returncode:
                    failed.append(name)
        time.sleep(2)
    # every cell is finished now: this run only gathers them into results.json / results.md / capacity.png
    final = subprocess.run(base, cwd=ROOT, capture_output=True, text=True)
    print(final.stdout, flush=True)
    if final.returncode:
        print(final.stderr[-4000:], file=sys.stderr)
    print(f"gpu_check: wall time {time.perf_counter() - started:.0f} s; failed methods: {failed or 'none'}", flush=True)
    return 1 if failed or final.returncode else 0


if __name__ == "__main__":
    raise SystemExit(main())
