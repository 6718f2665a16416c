"""Throughput of batch compression, every figure beside its baseline from the same run.

    python -m benchmarks.compress                       # about 4 minutes on 2 CPU cores
    python -m benchmarks.compress --docs 2048 --json docs/results/benchmark_compress.json \
        --plot docs/results/benchmark_compress.png

Reader: the paper's key-value reader (4 layers, d = 128, 8 memory vectors, K = 2; weights untrained, which
does not change the cost). Corpus: key-value contexts with N = 16 pairs (113 tokens). Cells:
- in-process batched writes (``Reader.write_tokens``, batch 64) against a per-document loop (batch 1), and what
  the batch job's ``--precision bfloat16`` and ``--compile`` buy: batched writes in bf16 arithmetic, eager and with
  ``Reader.compile()`` (its one-off compile not timed), against float32;
- the Ray Data pipeline (``pipelines.compress``, what jobs/compress.py runs; a local Ray, jsonl in, Parquet out)
  with 1 and 2 writer actors of one thread each, against in-process batched writes on one thread: the pipeline's overhead.
  "ctx_s" counts the writing pass (actor start-up, reader load, parse, tokenize, WRITE, Parquet out);
  "in_actor" only the time actors spent in their calls; "end_to_end" adds the duplicate-id pass;
- bytes per memory (float32 (m, d), and the Parquet bytes actually stored) against the KV cache the same
  context would occupy if it were kept instead (fp32 keys and values of every layer).
Machines are shared and noisy: read the ratios. The greedy reconstruction check is off in every cell (it is a
separate cost: one decoding step per context token).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, bar_plot, paper_reader, setup_logging
from gradmem.runtime import configure_cpu
from gradmem.tasks.kv import KVTask


def reader_dir(path: Path) -> Path:
    paper_reader().freeze().save_pretrained(path)
    return path


def precision_cells(path: Path, ids: list[list[int]]) -> dict[str, float]:
    """Batched writes of ``ids`` in bf16 arithmetic, eager, and compiled in float32 and bf16 (contexts/s): what
    ``--precision bfloat16`` and ``--compile`` buy a writer. Each compiled cell is warmed up (compiled) first."""
    from gradmem import Reader

    out = {}
    eager, compiled = Reader.from_pretrained(path), Reader.from_pretrained(path).compile()
    for name, reader, precision in (("inprocess_batched_bf16", eager, "bfloat16"), ("inprocess_compiled", compiled,
                                    "float32"), ("inprocess_compiled_bf16", compiled, "bfloat16")):
        setting = reader.write_setting(precision=precision)
        reader.write_tokens(ids[:64], setting, batch_size=64)  # warm-up (the compile, for compiled)
        start = time.perf_counter()
        reader.write_tokens(ids, setting, batch_size=64)
        out[f"{name}_ctx_s"] = rate(len(ids), time.perf_counter() - start)
    return out


# ratio name -> (numerator, denominator) among the results; a ratio is printed where both were measured
RATIOS = {
    "batched_over_loop": ("inprocess_batched_ctx_s", "inprocess_loop_ctx_s"),
    "ray_1_actor_over_inprocess": ("ray_1_actor_ctx_s", "inprocess_batched_ctx_s"),
    "ray_2_actors_over_1": ("ray_2_actor_ctx_s", "ray_1_actor_ctx_s"),
    "in_actor_over_inprocess": ("ray_1_actor_in_actor_ctx_s", "inprocess_batched_ctx_s"),
    "in_actor_2_over_1": ("ray_2_actor_in_actor_ctx_s", "ray_1_actor_in_actor_ctx_s"),
    "bf16_over_float32": ("inprocess_batched_bf16_ctx_s", "inprocess_batched_ctx_s"),
    "compiled_over_eager": ("inprocess_compiled_ctx_s", "inprocess_batched_ctx_s"),
    "compiled_bf16_over_compiled_float32": ("inprocess_compiled_bf16_ctx_s", "inprocess_compiled_ctx_s"),
    "kv_cache_over_memory_bytes": ("kv_cache_bytes", "memory_bytes"),
    "kv_cache_over_parquet_bytes": ("kv_cache_bytes", "parquet_bytes_per_memory"),
}


def write_corpus(corpus: Path, texts: list[str], shards: int = 8) -> Path:
    """``texts`` as ``shards`` jsonl files of {"id": "d<i>", "text": ...} records: the batch job's input."""
    corpus.mkdir(parents=True)
    for shard in range(shards):
        with open(corpus / f"shard-{shard}.jsonl", "w") as f:
            for i in range(shard, len(texts), shards):
                f.write(json.dumps({"id": f"d{i}", "text": texts[i]}) + "\n")
    return corpus


def pipeline_cells(reader: Path, corpus: Path, work: Path, docs: int, batch_size: int, gpus: float = 0.0,
                   precision: str = "float32") -> dict[str, float]:
    """The compression job (a local Ray already up) over ``corpus`` of ``docs`` documents with 1, then 2 writer
    actors sharing ``gpus``, each run into its own store under ``work``: contexts/s of its writing pass, end to end
    and inside the actors' calls (busy time only), and the Parquet bytes stored per memory."""
    from pipelines.compress import CompressConfig, compress

    results: dict[str, float] = {}
    for actors in (1, 2):
        out = work / f"out-{actors}"
        manifest = compress(CompressConfig(reader=str(reader), input=str(corpus), output=str(out), batch_size=batch_size,
                                           actors=actors, gpus_per_actor=gpus / actors, precision=precision,
                                           greedy_check=False, progress_every_s=30))
        if not (manifest["complete"] and manifest["memories"] == docs):
            raise RuntimeError(f"the compression job did not write every document: {manifest}")
        run = manifest["this_run"]
        results[f"ray_{actors}_actor_ctx_s"] = rate(docs, run["write_pass_s"])
        results[f"ray_{actors}_actor_end_to_end_ctx_s"] = rate(docs, run["wall_s"])
        results[f"ray_{actors}_actor_in_actor_ctx_s"] = rate(docs, run["write_s"] / actors)
        stored = sum(p.stat().st_size for p in (out / "memories").glob("part-*.parquet"))
        results["parquet_bytes_per_memory"] = stored / docs
    return results


def ratios(results: dict) -> dict[str, float]:
    """``RATIOS`` among ``results``, where both sides were measured."""
    return {name: results[a] / results[b] for name, (a, b) in RATIOS.items() if a in results and b in results}


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1024, help="corpus size for the batched and Ray cells")
    parser.add_argument("--loop-docs", type=int, default=128, help="documents for the per-document loop")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--scaling-only", action="store_true", help="only in-process batched writes and the Ray "
                        "cells (no per-document loop, no precision or compile cells): the pipeline's overhead and "
                        "its 1 -> 2 actor scaling, where a machine has the cores for it")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    configure_cpu(threads=1)  # one thread, as each writer actor gets
    from gradmem import Reader

    work = Path(tempfile.mkdtemp(prefix="gm-bench-compress-"))
    path = reader_dir(work / "reader")
    reader = Reader.from_pretrained(path)
    exs = KVTask(args.pairs).examples(args.docs, seed=[0, 0])
    texts = [e.context for e in exs]
    ids = reader.encode_contexts(texts)
    results: dict = {"docs": args.docs, "context_tokens": len(ids[0]), "m": reader.num_memory, "d": reader.d_model,
                     "steps": reader.config.write_steps}

    reader.write_tokens(ids[:64], batch_size=64)  # warm-up
    start = time.perf_counter()
    reader.write_tokens(ids, batch_size=64)
    results["inprocess_batched_ctx_s"] = rate(len(ids), time.perf_counter() - start)
    if not args.scaling_only:
        results.update(precision_cells(path, ids))
        start = time.perf_counter()
        for seq in ids[: args.loop_docs]:
            reader.write_tokens([seq], batch_size=1)
        results["inprocess_loop_ctx_s"] = rate(args.loop_docs, time.perf_counter() - start)

    import ray

    corpus = write_corpus(work / "corpus", texts)
    ray.init(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    results.update(pipeline_cells(path, corpus, work, args.docs, batch_size=64))
    ray.shutdown()

    cfg = reader.lm.config
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    results["memory_bytes"] = reader.num_memory * reader.d_model * 4
    results["kv_cache_bytes"] = 2 * cfg.num_hidden_layers * kv_heads * head_dim * len(ids[0]) * 4
    results["ratios"] = ratios(results)
    results["torch"] = torch.__version__
    results["cpus"] = os.cpu_count()
    for k, v in results.items():
        if k != "ratios":
            print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    for k, v in results["ratios"].items():
        print(f"ratio {k:34s} {v:.3g}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot and not args.scaling_only:
        labels = ["in-process loop", "in-process batched", "Ray 1 actor", "Ray 2 actors"]
        values = [results["inprocess_loop_ctx_s"], results["inprocess_batched_ctx_s"], results["ray_1_actor_ctx_s"],
                  results["ray_2_actor_ctx_s"]]
        bar_plot(args.plot, labels, values, "contexts / s",
                 f"Compression throughput (N={args.pairs}, {len(ids[0])} tokens, K={results['steps']}, CPU)")
    return results


if __name__ == "__main__":
    main()
