"""Do the meta-step's fast paths train as the plain path does? Short runs of one config from one seed, with each
precision and compile choice, beside the plain run from another seed (the spread a seed alone makes).

    python -m benchmarks.numerics --config benchmarks/configs/numerics_kv_cpu.yaml --output runs/numerics_kv_cpu --threads 2

Variants (``VARIANTS``): fp32 plain; fp32 with the WRITE's gradient step compiled (``optim.compile_write``);
bf16 autocast over fp32 weights; both; and fp32 plain from the next seed (model and data). Each trains in its own
directory under ``--output`` with the in-process ``Trainer``; a finished variant (its ``result.json``) is not run
again, so a killed run resumes by rerunning the command. Writes results.json, results.md (loss gap to the fp32 run
against the seed's gap, validation EM at each evaluation, seconds per step) and numerics.png (the loss curves).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import ROOT, deep_merge, git_commit, setup_logging, write_json_atomic
from gradmem.runtime import configure_cpu
from gradmem.train import TrainConfig, Trainer

VARIANTS: dict[str, dict] = {
    "fp32": {},
    "fp32, next seed": {"model": {"seed": 1}, "optim": {"seed": 1}},
    "fp32, compiled write step": {"optim": {"compile_write": True}},
    "bf16 autocast": {"optim": {"autocast": "bfloat16"}},
    "bf16 autocast, compiled write step": {"optim": {"autocast": "bfloat16", "compile_write": True}},
}


def slug(name: str) -> str:
    """The variant's directory and command-line name: "fp32, next seed" -> "fp32_next_seed"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_variant(base: dict, name: str, output: Path) -> dict:
    """Train one variant (or read its finished result) -> {"train": [(step, loss)], "eval": [(step, em)], ...}."""
    directory = output / slug(name)
    done = directory / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = TrainConfig.from_dict(deep_merge(base, VARIANTS[name]))
    if directory.exists():  # an unfinished run: start it again (short runs; a resume would mix two processes' timing)
        import shutil

        shutil.rmtree(directory)
    started = time.perf_counter()
    Trainer(cfg, directory).fit()
    wall = time.perf_counter() - started
    events = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    result = {
        "variant": name, "overrides": VARIANTS[name], "wall_s": wall,
        "train": [[e["step"], e["loss"]] for e in train],
        "eval": [[e["step"], e["em"]] for e in events if e["event"] == "eval"],
        # steps/s of the windows after the first (the first holds any compile)
        "seconds_per_step": (sum(1 / e["samples_per_s"] * cfg.optim.batch_size for e in train[1:]) / max(len(train) - 1, 1)),
    }
    write_json_atomic(done, result)
    return result


def gap(a: list[list[float]], b: list[list[float]]) -> float:
    """Mean absolute difference of two loss curves logged at the same steps."""
    pairs = [(x[1], y[1]) for x, y in zip(a, b) if x[0] == y[0]]
    return sum(abs(x - y) for x, y in pairs) / max(len(pairs), 1)


def report(results: dict[str, dict], meta: dict) -> str:
    ref, seed = results["fp32"], results.get("fp32, next seed")
    lines = [f"# Meta-step numerics: fast paths against the plain fp32 run", "",
             f"Command: `{meta['command']}`; commit {meta['commit']}; config `{meta['config']}`.", "",
             "Loss gap: mean |loss - fp32 loss| over the logged windows (each the mean of `log_every` steps); the "
             "next seed's gap is the yardstick: a fast path within it trains as differently as a new seed does, no more.", "",
             "| variant | loss gap to fp32 | final loss | validation EM by step | s / step | wall s |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        ems = ", ".join(f"{int(s)}: {100 * em:.1f}%" for s, em in r["eval"])
        lines.append(f"| {name} | {gap(r['train'], ref['train']):.4f} | {r['train'][-1][1]:.4f} | {ems} | "
                     f"{r['seconds_per_step']:.3f} | {r['wall_s']:.0f} |")
    if seed is not None:
        lines += ["", f"Seed yardstick: {gap(seed['train'], ref['train']):.4f}."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        steps, losses = zip(*r["train"])
        ax.plot(steps, losses, label=name, linestyle="--" if "seed" in name else "-", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("outer loss (window mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("meta-training loss by precision and compile path", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default=",".join(map(slug, VARIANTS)),
                        help=f"comma-separated, of: {', '.join(map(slug, VARIANTS))} (fp32 always runs)")
    parser.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps (smoke runs)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads is not None:
        configure_cpu(threads=args.threads)
    by_slug = {slug(name): name for name in VARIANTS}
    wanted = {n.strip() for n in args.variants.split(",") if n.strip()} | {"fp32"}
    if wanted - set(by_slug):
        parser.error(f"unknown variants {sorted(wanted - set(by_slug))}; choose from {sorted(by_slug)}")
    names = [name for key, name in by_slug.items() if key in wanted]  # VARIANTS' order
    base = yaml.safe_load(Path(args.config).read_text())
    if args.max_steps is not None:
        base = deep_merge(base, {"optim": {"max_steps": args.max_steps}})
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        results[name] = run_variant(base, name, output)
        print(f"numerics: {name}: {results[name]['wall_s']:.0f} s, final loss {results[name]['train'][-1][1]:.4f}", flush=True)
    meta = {"command": "python -m benchmarks.numerics " + " ".join(sys.argv[1:] if argv is None else argv),
            "config": args.config, **git_commit(ROOT)}
    write_json_atomic(output / "results.json", {**meta, "results": results})
    (output / "results.md").write_text(report(results, meta))
    plot(results, output / "numerics.png")
    print((output / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
