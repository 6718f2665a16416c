"""Adaptive writes against fixed K: exact match and write seconds on held-out contexts, and whether a memory's
reconstruction accuracy predicts a correct answer.

    GRADMEM_DATA=/path/to/data python -m benchmarks.adaptive \\
        --kv-reader runs/capacity_cpu/runs/gradmem_k2_N4/best --kv-pairs 4 \\
        --babi-reader runs/babi_qa1_cpu/runs/gradmem/best --babi-config runs/babi_qa1_cpu/runs/gradmem/config.yaml \\
        --output docs/results/adaptive_writes --threads 1

Each task is one trained reader on held-out contexts (key-value: a seed no training stream uses; bAbI: the test
split of the reader's own task config). Every setting writes the same batches, side by side in one run: fixed K
in ``--fixed`` and, with K_max = ``--k-max``, an adaptive write per target in ``--kv-targets`` /
``--babi-targets`` and per floor in ``--min-steps`` (each context written for the floor's steps, then until the
teacher-forced reconstruction accuracy of its memory reaches the target, ``gradmem.write.inference_steps``; the
floor ``K`` is the reader's trained K). Within a batch the settings run in a rotating order, so machine
noise and cache warmth fall on all of them alike. Write seconds are the WRITE calls alone (the final-statistics
forward included, as every stored memory pays it), each batch's the fastest of ``--repeats`` identical writes (a
shared machine's bursts only ever add time); answers are the teacher-forced exact match of the READ.

Recon -> answer: for every fixed K, the exact match per bin of reconstruction accuracy, Pearson's r between a
context's reconstruction accuracy and its 0/1 correctness, and the AUC (the chance that a correctly answered
context has the higher reconstruction accuracy than a wrongly answered one; 0.5: no signal).

Output: results.json (every figure, per-setting step histograms), per_context.json (each context's reconstruction
accuracy, 0/1 correctness and steps used per setting, compact), results.md (the tables), adaptive.png (EM against
write milliseconds per context; EM per reconstruction-accuracy bin). Without --babi-reader only the
key-value task runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, device_name, git_commit, jsonable, pct, save_figure, write_atomic, write_json_atomic
from gradmem import Reader, WriteSetting, methods
from gradmem.config import from_yaml
from gradmem.read import read_teacher_forced
from gradmem.runtime import configure_cpu, setup_logging
from gradmem.tasks.base import Task
from gradmem.tasks.kv import KVTask
from gradmem.train import TrainConfig, build_task, hash_seed

logger = logging.getLogger("benchmarks.adaptive")
HELD_OUT_SEED = ("adaptive_writes", 0)  # not a training stream's seed (those are [seed, rank, step, ...])
BINS = 5


def label(setting: WriteSetting) -> str:
    """A setting's name in the results: K (fixed), or the target and the range of steps (adaptive)."""
    if setting.target is None:
        return f"K={setting.steps}"
    return f"target {setting.target:g}, K {setting.min_steps}..{setting.steps}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-reader", required=True, help="a trained key-value reader directory")
    parser.add_argument("--kv-pairs", type=int, required=True, help="pairs per context (the reader's training N)")
    parser.add_argument("--kv-samples", type=int, default=1000, help="held-out key-value contexts")
    parser.add_argument("--kv-targets", default="0.93,0.96,1.0", help="adaptive targets for key-value (a context of "
                        "4 pairs has 29 tokens: 0.93 and 0.96 allow 2 and 1 wrong tokens)")
    parser.add_argument("--babi-reader", default=None, help="a trained bAbI reader directory (optional)")
    parser.add_argument("--babi-config", default=None, help="its training config (YAML): the task section is used")
    parser.add_argument("--babi-samples", type=int, default=1000, help="test questions (at most the split)")
    parser.add_argument("--babi-targets", default="0.2,0.25,0.3", help="adaptive targets for bAbI")
    parser.add_argument("--fixed", default="1,2,4,8", help="fixed K to compare")
    parser.add_argument("--k-max", type=int, default=8, help="K_max of the adaptive writes")
    parser.add_argument("--min-steps", default="0,K", help="floors of the adaptive writes (K: the reader's trained K)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed writes per batch and setting (the fastest counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--output", default="runs/adaptive_writes")
    args = parser.parse_args(argv)
    if args.babi_reader and not args.babi_config:
        parser.error("--babi-reader needs --babi-config (the task it was trained on)")
    return args


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------- measuring
def measure(reader: Reader, task: Task, samples: int, settings: list[WriteSetting], batch_size: int,
            repeats: int) -> dict[str, Any]:
    """Per setting: per-context correctness, reconstruction accuracy and steps used, and the WRITE seconds."""
    samples = task.eval_size(samples)
    per = {s: {"correct": [], "recon": [], "steps_used": [], "write_s": 0.0} for s in settings}
    for i, start in enumerate(range(0, samples, batch_size)):
        n = min(batch_size, samples - start)
        batch = task.eval_batch(start, n, [hash_seed(HELD_OUT_SEED), i], reader.tokenizer).to(reader.device)
        turn = i % len(settings)
        for setting in settings[turn:] + settings[:turn]:  # rotating order: noise falls on every setting alike
            seconds = []
            for _ in range(repeats):  # the same deterministic write each time
                began = time.perf_counter()
                out = methods.write(reader, batch.ctx_ids, batch.ctx_mask, setting.steps, setting.lr, mode="inference",
                                    target=setting.target, min_steps=setting.min_steps)
                seconds.append(time.perf_counter() - began)
            per[setting]["write_s"] += min(seconds)
            with torch.no_grad():
                read = read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask)
            per[setting]["correct"] += read.exact_match.float().tolist()
            per[setting]["recon"] += out.accuracy.float().tolist()
            per[setting]["steps_used"] += out.steps_used.tolist()
        logger.info("%s: %d/%d contexts", task.name if hasattr(task, "name") else "task", start + n, samples)
    return {label(s): summarize(s, per[s]) for s in settings}


def summarize(setting: WriteSetting, raw: dict[str, Any]) -> dict[str, Any]:
    n = len(raw["correct"])
    used = raw["steps_used"]
    return {
        "steps": setting.steps, "target": setting.target, "min_steps": setting.min_steps, "contexts": n,
        "em": sum(raw["correct"]) / n, "write_s": raw["write_s"], "write_ms_per_context": 1000 * raw["write_s"] / n,
        "mean_steps_used": sum(used) / n, "steps_histogram": {k: used.count(k) for k in range(setting.steps + 1)},
        "mean_recon": sum(raw["recon"]) / n, "recon_vs_answer": recon_vs_answer(raw["recon"], raw["correct"]),
        "per_context": {"recon": raw["recon"], "correct": raw["correct"], "steps_used": used},
    }


def recon_vs_answer(recon: list[float], correct: list[float]) -> dict[str, Any]:
    """Exact match per bin of reconstruction accuracy (equal-width bins over the observed range), Pearson's r
    and the AUC of reconstruction accuracy as a predictor of a correct answer."""
    x, y = torch.tensor(recon, dtype=torch.float64), torch.tensor(correct, dtype=torch.float64)
    lo, hi = float(x.min()), float(x.max())
    edges = torch.linspace(lo, hi, BINS + 1) if hi > lo else torch.tensor([lo, hi])
    index = torch.bucketize(x, edges[1:-1], right=True) if hi > lo else torch.zeros_like(x, dtype=torch.long)
    bins = [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int((index == b).sum()),
             "em": float(y[index == b].mean()) if bool((index == b).any()) else None} for b in range(len(edges) - 1)]
    r = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if x.std() > 0 and y.std() > 0 else None
    return {"bins": bins, "pearson_r": r, "auc": auc(x, y)}


def auc(score: torch.Tensor, label: torch.Tensor) -> float | None:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = score[label > 0.5], score[label <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


# ---------------------------------------------------------------------------------------------- reports
def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Adaptive writes against fixed K", "",
             f"- command: `{results['command']}`", f"- commit {results['commit']['commit']} "
             f"(dirty: {results['commit']['dirty']}), {results['device']}, torch threads {results['threads']}, "
             f"wall {results['wall_s']:.0f} s", ""]
    for name, task in results["tasks"].items():
        lines += [f"## {name}: {task['description']}", "",
                  "| setting | EM % | write s | write ms / context | mean steps used | steps used (0..K) | "
                  "mean recon acc | recon->answer AUC | Pearson r |", "|---|---|---|---|---|---|---|---|---|"]
        for label, s in task["settings"].items():
            hist = " ".join(str(s["steps_histogram"][k]) for k in sorted(s["steps_histogram"], key=int))
            rv = s["recon_vs_answer"]
            lines.append(f"| {label} | {pct(s['em'])} | {s['write_s']:.2f} | {s['write_ms_per_context']:.2f} | "
                         f"{s['mean_steps_used']:.2f} | {hist} | {s['mean_recon']:.3f} | {fmt(rv['auc'])} | "
                         f"{fmt(rv['pearson_r'])} |")
        lines += ["", "EM % per bin of reconstruction accuracy (fixed K; n contexts in brackets):", ""]
        for label, s in task["settings"].items():
            if s["target"] is None:
                cells = ", ".join(f"[{b['lo']:.3f}, {b['hi']:.3f}]: {pct(b['em'])} ({b['n']})"
                                  for b in s["recon_vs_answer"]["bins"] if b["n"])
                lines.append(f"- {label}: {cells}")
        lines.append("")
    return "\n".join(lines)


def split_per_context(results: dict[str, Any]) -> dict[str, Any]:
    """Take the per-context lists out of ``results`` (they would make results.json megabytes of one number a line):
    {task: {setting: {"recon": [...], "correct": [...], "steps_used": [...]}}}, accuracies to 4 decimals."""
    out: dict[str, Any] = {}
    for name, task in results["tasks"].items():
        out[name] = {}
        for label, setting in task["settings"].items():
            per = setting.pop("per_context")
            out[name][label] = {**per, "recon": [round(x, 4) for x in per["recon"]]}
    return out


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    for row, (name, task) in enumerate(tasks.items()):
        settings = task["settings"].values()
        fixed = [s for s in settings if s["target"] is None]
        adaptive = [s for s in settings if s["target"] is not None]
        ax = axes[row][0]
        ax.plot([s["write_ms_per_context"] for s in fixed], [100 * s["em"] for s in fixed], "o-", label="fixed K")
        for s in fixed:
            ax.annotate(f"K={s['steps']}", (s["write_ms_per_context"], 100 * s["em"]), fontsize=8)
        ax.plot([s["write_ms_per_context"] for s in adaptive], [100 * s["em"] for s in adaptive], "s",
                color="#c0504d", label=f"adaptive target/min steps (K_max={adaptive[0]['steps'] if adaptive else '-'})")
        for s in adaptive:
            ax.annotate(f"{s['target']:g}/{s['min_steps']}", (s["write_ms_per_context"], 100 * s["em"]), fontsize=8,
                        color="#c0504d")
        ax.set_xlabel("write ms per context")
        ax.set_ylabel("exact match %")
        ax.set_title(f"{name}: EM against write time", fontsize=10)
        ax.legend(fontsize=8)
        ax = axes[row][1]
        for s in fixed:
            bins = [b for b in s["recon_vs_answer"]["bins"] if b["n"]]
            ax.plot([(b["lo"] + b["hi"]) / 2 for b in bins], [100 * b["em"] for b in bins], "o-",
                    label=f"K={s['steps']} (AUC {fmt(s['recon_vs_answer']['auc'])})")
        ax.set_xlabel("reconstruction accuracy of the memory (bin centre)")
        ax.set_ylabel("exact match % in the bin")
        ax.set_title(f"{name}: does reconstruction predict the answer?", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- main
def run_task(name: str, description: str, reader_dir: str, task: Task, samples: int, fixed: list[int],
             k_max: int, targets: list[float], floors: list[str], batch_size: int, repeats: int) -> dict[str, Any]:
    reader = Reader.from_pretrained(reader_dir)
    trained = reader.config.write_steps
    mins = sorted({trained if f.strip() == "K" else int(f) for f in floors})
    lr = reader.config.write_lr
    settings = [WriteSetting(k, lr) for k in fixed] + [WriteSetting(k_max, lr, t, m) for m in mins for t in targets]
    logger.info("%s: reader %s (trained K=%d, alpha=%g), %d settings", name, reader.fingerprint,
                reader.config.write_steps, reader.config.write_lr, len(settings))
    return {"description": description, "reader": reader_dir, "fingerprint": reader.fingerprint,
            "trained_steps": reader.config.write_steps, "write_lr": reader.config.write_lr,
            "settings": measure(reader, task, samples, settings, batch_size, repeats)}


def main(argv: list[str] | None = None) -> None:
    import sys

    args = parse_args(argv)
    setup_logging()
    configure_cpu(args.threads)
    started = time.time()
    fixed = [int(k) for k in args.fixed.split(",")]
    tasks = {"key-value": run_task("key-value", f"N = {args.kv_pairs} pairs, {args.kv_samples} held-out contexts",
                                   args.kv_reader, KVTask(args.kv_pairs), args.kv_samples, fixed, args.k_max,
                                   floats(args.kv_targets), args.min_steps.split(","), args.batch_size,
                                   args.repeats)}
    if args.babi_reader:
        task_cfg = from_yaml(TrainConfig, args.babi_config).task
        task = build_task(task_cfg, "test")
        tasks["bAbI"] = run_task("bAbI", f"{'+'.join(task_cfg.tasks)} test split, "
                                 f"{task.eval_size(args.babi_samples)} questions", args.babi_reader, task,
                                 args.babi_samples, fixed, args.k_max, floats(args.babi_targets),
                                 args.min_steps.split(","), args.batch_size, args.repeats)
    results = {"command": "python -m benchmarks.adaptive " + " ".join(sys.argv[1:] if argv is None else argv),
               "commit": git_commit(ROOT), "device": device_name("cpu"), "threads": torch.get_num_threads(),
               "wall_s": time.time() - started, "tasks": tasks}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "per_context.json", json.dumps(split_per_context(results), separators=(",", ":")) + "\n")
    write_json_atomic(out / "results.json", jsonable(results))
    text = markdown(results)
    write_atomic(out / "results.md", text + "\n")
    plot(results, out / "adaptive.png")
    print(text)


if __name__ == "__main__":
    main()
