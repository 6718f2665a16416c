"""The main job, end to end on one machine, on a local Ray: the whole product with embedded defaults.

    make demo                                   # sets up .venv, then runs the line below
    python jobs/demo.py --output runs/demo      # --max-steps N for a shorter training run

1. meta-trains a small key-value reader with Ray Train + DeepSpeed ZeRO-2 (2 CPU workers, gloo);
2. compresses a corpus of key-value documents (with a few bad records) with Ray Data into a local Parquet
   memory store (OUTPUT/memories, OUTPUT/errors, OUTPUT/manifest.json);
3. starts the query service on Ray Serve (127.0.0.1, a free port), asks questions over HTTP about documents
   the service holds only as memories, and writes one new document online;
4. prints answers and exact match, and shuts Serve and Ray down.
About 5 minutes on 2 CPU cores. Every run starts afresh in OUTPUT (its previous demo files are replaced).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import _common  # noqa: F401
from _common import ROOT, free_port, send_stderr_to, setup_logging

from gradmem.tasks.kv import KVTask, exact_match
from gradmem.config import override
from gradmem.train import TrainConfig

logger = logging.getLogger("demo")


def write_corpus(path: Path, pairs: int, n: int) -> list:
    """n key-value documents in two jsonl shards, plus three bad records that must end as error rows."""
    exs = KVTask(pairs).examples(n, seed=[2026, 11, 27])
    path.mkdir(parents=True)
    lines = [json.dumps({"id": f"doc-{i:03d}", "text": e.context}) for i, e in enumerate(exs)]
    (path / "part-0.jsonl").write_text("\n".join(lines[: n // 2]) + "\n")
    bad = [json.dumps({"id": "empty", "text": ""}), "{not json", json.dumps({"id": "doc-000", "text": "!aa:bb!|"})]
    (path / "part-1.jsonl").write_text("\n".join(lines[n // 2:] + bad) + "\n")
    return exs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "jobs/configs/kv_demo.yaml"))
    parser.add_argument("--output", default="runs/demo")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--verbose", action="store_true", help="show every log line of Ray, its workers and ours "
                        "(default: only the demo's story; the logs go to OUTPUT/demo.log)")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.output).resolve()
    story = os.dup(1)  # the terminal: run() sends stdout to the log while Ray shuts down
    if not args.verbose:  # the story on stdout; every log line (ours, Ray's, warnings) in OUTPUT/demo.log
        send_stderr_to(out / "demo.log")
    try:
        run(args, out)
    except BaseException as exc:
        if not args.verbose and not isinstance(exc, KeyboardInterrupt):
            sys.stdout.flush()
            os.dup2(story, 1)
            print(f"demo failed: {type(exc).__name__}: {exc}\n   the log says why: {out / 'demo.log'}", flush=True)
        raise


def run(args: argparse.Namespace, out: Path) -> None:
    import ray
    import requests
    from ray import serve

    from pipelines.compress import CompressConfig, compress
    from pipelines.serve import build_app
    from pipelines.train import DistributedConfig, fit

    for stale in ("ray", "reader", "corpus", "memories"):
        shutil.rmtree(out / stale, ignore_errors=True)
    cfg = TrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        cfg = override(cfg, {"optim.max_steps": args.max_steps})
    started = time.perf_counter()
    # Quiet: the workers' output (Ray Train reports, DeepSpeed, Serve replicas) stays in Ray's log files.
    ray.init(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
             log_to_driver=args.verbose)
    try:
        print(f"== 1/4 Ray Train + DeepSpeed ZeRO-2, 2 workers: meta-training a reader on key-value retrieval with "
              f"{cfg.task.pairs} pairs (at most {cfg.optim.max_steps} steps)", flush=True)
        ds = json.loads((ROOT / "jobs/configs/ds_zero2.json").read_text())
        result = fit(cfg, DistributedConfig(num_workers=2, deepspeed=ds, storage=str(out / "ray"), name="kv_demo"),
                     output=out / "reader")
        if result.error:
            raise SystemExit(f"training failed: {result.error}")
        stop = result.metrics.get("stop_reason") or "the step cap"
        print(f"   trained {result.metrics['step']} steps in {time.perf_counter() - started:.0f}s (stopped by {stop}); "
              f"the best reader by validation exported to {out / 'reader'}", flush=True)

        print(f"== 2/4 Ray Data: compressing {args.docs} documents (+3 bad records) into {out / 'memories'}", flush=True)
        exs = write_corpus(out / "corpus", cfg.task.pairs, args.docs)
        t = time.perf_counter()
        manifest = compress(CompressConfig(reader=str(out / "reader"), input=str(out / "corpus"),
                                           output=str(out / "memories"), actors=1, batch_size=64))
        print(f"   {manifest['inputs']} inputs -> {manifest['memories']} memories + {manifest['errors']} errors "
              f"{manifest['error_reasons']} in {time.perf_counter() - t:.0f}s; complete={manifest['complete']}", flush=True)

        port = free_port()
        print(f"== 3/4 Ray Serve: query service on http://127.0.0.1:{port}", flush=True)
        serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options={"grpc_servicer_functions": []})
        serve.run(build_app({"reader": str(out / "reader"), "memories": str(out / "memories")}), name="demo",
                  route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        correct, shown = 0, 0
        for i, e in enumerate(exs):
            doc = f"doc-{i:03d}"
            r = requests.post(f"{base}/v1/query", json={"doc_id": doc, "questions": [e.query], "max_new_tokens": 4},
                              timeout=60)
            r.raise_for_status()
            answer = r.json()["answers"][0]
            ok = exact_match(answer, e.target)
            correct += ok
            if shown < 5:
                print(f"   {doc}: query {e.query}  answer {answer!r}  truth {e.target[:2]!r}  {'ok' if ok else 'wrong'}")
                shown += 1
        em = correct / len(exs)
        new = KVTask(cfg.task.pairs).examples(1, seed=[7, 7, 7])[0]
        written = requests.post(f"{base}/v1/memories", json={"doc_id": "online-1", "text": new.context}, timeout=60).json()
        online = requests.post(f"{base}/v1/query", json={"memory_id": written["memory_id"], "questions": [new.query],
                                                          "max_new_tokens": 4}, timeout=60).json()["answers"][0]
        print(f"   online write of a new document -> memory {written['memory_id']}; answer {online!r} "
              f"(truth {new.target[:2]!r})")
        missing = requests.post(f"{base}/v1/query", json={"doc_id": "empty", "questions": ["?"]}, timeout=60)
        print(f"   the empty record was never stored: {missing.status_code} {missing.json()['error']}")
        print(f"== 4/4 exact match over HTTP from memory alone: {em:.3f} ({correct}/{len(exs)}); "
              f"total {time.perf_counter() - started:.0f}s", flush=True)
        if not args.verbose:
            print(f"   logs: {out / 'demo.log'} (this process), Ray's session directory for its workers "
                  "(/tmp/ray/session_latest/logs); --verbose shows them here")
    finally:
        if not args.verbose:  # what Ray prints while it shuts down is log, not story
            sys.stdout.flush()
            os.dup2(2, 1)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
