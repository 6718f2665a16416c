"""Load test of the query service, loopback only, bounded in time; batched vs unbatched in one run.

    python -m benchmarks.loadtest_serve                      # about 2 minutes on 2 CPU cores
    python -m benchmarks.loadtest_serve --clients 16 --seconds 30 --json docs/results/loadtest_serve.json \
        --plot docs/results/loadtest_serve.png

Starts a local Ray, writes memories of key-value contexts (N = 16 pairs, 113 tokens) with the paper's reader
(4 layers, d = 128, 8 memory vectors; untrained weights, which do not change the cost) into a local store,
and deploys the service twice: with ``@serve.batch`` (up to 32 questions per forward pass) and with batching
off (1). CLIENTS threads then send single-question queries about random documents for SECONDS each; it
prints requests/s, p50 and p99 latency and the error count per mode, and the ratio. Last, in-process: the
latency of answering from memory against answering with the full context in the prompt (same model, greedy,
one question and a batch of 32). Machines are shared and noisy: read the ratios. The deployment's size
(``--replicas``, or autoscaling with ``--max-replicas`` / ``--target-ongoing-requests``) is named in the
results (``replicas`` and ``scaling``, Serve's own options) and in the plot's title.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import requests
import torch

from benchmarks.common import ROOT, paper_reader, setup_logging, timed
from gradmem.runtime import free_port


def load(url: str, doc_ids: list[str], queries: dict[str, str], clients: int, seconds: float) -> dict:
    """CLIENTS threads posting one question each, back to back, for SECONDS."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rng, session = random.Random(seed), requests.Session()
        while time.perf_counter() < deadline:
            doc = rng.choice(doc_ids)
            start = time.perf_counter()
            try:
                r = session.post(url, json={"doc_id": doc, "questions": [queries[doc]], "max_new_tokens": 4}, timeout=60)
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"requests": len(latencies), "errors": errors[0], "rps": len(latencies) / wall,
            "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98]}


def store_memories(directory: Path, memories, ids: list[list[int]]) -> list[str]:
    """``memories`` as one part of a local store the service reads, under ids doc-0, doc-1, ... (returned)."""
    from gradmem import records
    from gradmem.store import MemoryStore

    doc_ids = [f"doc-{i}" for i in range(len(memories))]
    MemoryStore(pafs.LocalFileSystem(), str(directory)).write_part("memories", records.to_table(memories, doc_ids, ids))
    return doc_ids


def model_latency(reader, memories, contexts: list[str], questions: list[str], batch: int, repeats: int) -> dict:
    """Median seconds for greedy answers from memory vs with the context in the prompt (no memory prefix)."""
    from gradmem.data import tokenize
    from gradmem.read import greedy_generate

    q_ids = tokenize(reader.tokenizer, questions[:batch])
    full = [c + q for c, q in zip(tokenize(reader.tokenizer, contexts[:batch]), q_ids)]
    empty = torch.zeros(batch, 0, reader.d_model)  # (B, 0, d): no memory, the context is in the prompt
    prefix = reader.method.memory_input(reader, memories.tensor[:batch])  # (B, m, d)
    m_rows = torch.full((batch,), reader.num_memory)
    no_rows = torch.zeros(batch, dtype=torch.long)

    with torch.no_grad():
        from_memory = timed(lambda: greedy_generate(reader, prefix, m_rows, q_ids, 4, set()), repeats)
        with_context = timed(lambda: greedy_generate(reader, empty, no_rows, full, 4, set()), repeats)
    return {"from_memory_ms": 1000 * from_memory, "full_context_ms": 1000 * with_context,
            "full_context_over_memory": with_context / from_memory}


def replica_words(scaling: dict) -> str:
    """``1 replica`` or ``1-4 replicas (autoscaling, target 8)``: how the results name the deployment's size."""
    if "num_replicas" in scaling:
        n = scaling["num_replicas"]
        return f"{n} replica{'s' if n != 1 else ''}"
    auto = scaling["autoscaling_config"]
    target = f", target {auto['target_ongoing_requests']:g}" if "target_ongoing_requests" in auto else ""
    return f"{auto['min_replicas']}-{auto['max_replicas']} replicas (autoscaling, from {auto['initial_replicas']}{target})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1, help="replicas (with --max-replicas: the starting count)")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    parser.add_argument("--target-ongoing-requests", type=float, default=None, help="autoscaling target per replica")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    from gradmem import Reader
    from gradmem.runtime import configure_cpu
    from gradmem.tasks.kv import KVTask

    configure_cpu(threads=1)
    work = Path(tempfile.mkdtemp(prefix="gm-loadtest-"))
    paper_reader().freeze().save_pretrained(work / "reader")
    reader = Reader.from_pretrained(work / "reader")
    exs = KVTask(args.pairs).examples(args.docs, seed=[4, 4])
    contexts = [e.context for e in exs]
    ids = reader.encode_contexts(contexts)
    memories = reader.write_tokens(ids)
    doc_ids = store_memories(work / "memories", memories, ids)
    queries = {d: e.query for d, e in zip(doc_ids, exs)}

    import ray
    from ray import serve

    from gradmem.config import from_dict
    from pipelines.serve import ServeConfig, build_app

    ray.init(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options={"grpc_servicer_functions": []})
    service = {"reader": str(work / "reader"), "memories": str(work / "memories"), "replicas": args.replicas,
               "max_replicas": args.max_replicas, "target_ongoing_requests": args.target_ongoing_requests}
    scaling = from_dict(ServeConfig, service).scaling()  # what the deployment ran with, named in the results
    results: dict = {"clients": args.clients, "seconds": args.seconds, "docs": args.docs,
                     "context_tokens": len(ids[0]), "replicas": args.replicas, "scaling": scaling}
    for name, batch in (("batched", 32), ("unbatched", 1)):
        serve.run(build_app({**service, "max_batch_size": batch}), name=name, route_prefix=f"/{name}")
        url = f"http://127.0.0.1:{port}/{name}/v1/query"
        load(url, doc_ids, queries, clients=2, seconds=2)  # warm the replica's cache and code paths
        results[name] = load(url, doc_ids, queries, args.clients, args.seconds)
        print(f"{name:10s} {results[name]}", flush=True)
        serve.delete(name)
    serve.shutdown()
    ray.shutdown()

    results["model_latency_1"] = model_latency(reader, memories, contexts, [e.query for e in exs], 1, 20)
    results["model_latency_32"] = model_latency(reader, memories, contexts, [e.query for e in exs], 32, 5)
    results["ratios"] = {
        "batched_over_unbatched_rps": results["batched"]["rps"] / results["unbatched"]["rps"],
        "unbatched_over_batched_p50": results["unbatched"]["p50_ms"] / results["batched"]["p50_ms"],
        "full_context_over_memory_latency_1": results["model_latency_1"]["full_context_over_memory"],
        "full_context_over_memory_latency_32": results["model_latency_32"]["full_context_over_memory"],
    }
    for k in ("model_latency_1", "model_latency_32"):
        print(f"{k:16s} {results[k]}")
    for k, v in results["ratios"].items():
        print(f"ratio {k:36s} {v:.3g}x")
    print(f"deployment: {replica_words(scaling)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        modes = ["batched", "unbatched"]
        bars = axes[0].bar(modes, [results[m]["rps"] for m in modes], color="#4472c4")
        axes[0].bar_label(bars, fmt="%.3g")
        axes[0].set_ylabel("requests / s")
        axes[0].set_title(f"{args.clients} clients, {args.seconds:.0f} s each", fontsize=10)
        x = range(2)
        axes[1].bar([i - 0.2 for i in x], [results[m]["p50_ms"] for m in modes], 0.4, label="p50")
        axes[1].bar([i + 0.2 for i in x], [results[m]["p99_ms"] for m in modes], 0.4, label="p99")
        axes[1].set_xticks(list(x), modes)
        axes[1].set_ylabel("latency (ms)")
        axes[1].legend()
        fig.suptitle(f"GradMem query service on Ray Serve (CPU, {replica_words(scaling)})", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return results


if __name__ == "__main__":
    main()
