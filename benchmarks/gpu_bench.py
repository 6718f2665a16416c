"""GPU speed of the GradMem core against the card's limit: meta-step and inference-write time, with model FLOP
utilisation (MFU) from FLOPs counted as they run.

    python -m benchmarks.gpu_bench --output runs/gpu_bench          # on a GPU machine, about 3 minutes
    python -m benchmarks.gpu_bench --output /tmp/gb --smoke         # a CPU smoke run of the same code (tiny shapes)
    make gpu-bench                                                  # set-up, the CUDA tests, then every cell

Readers (weights from their config, random: speed does not depend on their values):
- ``kv``: the paper's key-value reader (4 layers, d = 128, Llama-3.2-1B's RoPE and tied embeddings), fp32, batch
  64, N = 16 contexts (113 tokens), 8 memory vectors, K = 2, second-order meta-step (write + read + backward), the
  auxiliary write loss at 0.5 (the authors' key-value recipe).
- ``smollm2``: SmolLM2-135M's shape (30 layers, d = 576, 9 heads / 3 KV heads, vocabulary 49152), fp32 weights
  with bf16 autocast (the bAbI GPU configuration), batch 64, contexts of 100 tokens, K = 2, the READ loss alone
  (the authors' natural-language recipe: no auxiliary write loss; the "before" run of 2026-11-29 had it at 0.5).
- ``smollm2_bf16``: the same with the whole model cast to bf16 and no autocast, as the authors train
  natural-language readers (``model.dtype: bfloat16``): no casts between fp32 weights and bf16 products.

For each: seconds per meta-step and per inference write (first order, K = 2) over ``--repeats`` timed calls after
a warm-up, FLOPs counted with ``torch.utils.flop_counter``'s formulas on one call (matrix products, attention
and their backward / double backward, as executed), and MFU = FLOPs / time / peak, where the peak is the card's
dense bf16 figure (``--peak-tflops``, default 989 for an H100/H200 SXM). Writes bench.json, bench.md and
bench.png (MFU per cell).

For ``kv`` also the training loop's own step (``gradmem.loop`` through ``Trainer``: the batch, the meta-step, the
metrics read on the host, clipping and AdamW) beside the bare meta-step.

``--ray``: also the Ray parts on the device (``bench_ray``): the compression job with 1 and 2 writer actors sharing
the GPU against in-process writes, and the query service's requests/s and latency under ``--clients``.

``--compiled``: also the compiled paths, each timed after its first call (the compile, reported apart): the
meta-step with the WRITE's gradient step compiled (``MemoryCell.compile_write_step``) and the inference write of
``Reader.compile()``; MFU from the eager call's FLOP count (the same arithmetic). The cells run quickest first:
every reader eager, then the Ray cells, then the compiles (SmolLM2's 30 layers' double backward takes minutes);
every file is rewritten after each cell, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from transformers import LlamaConfig

from benchmarks.common import setup_logging
from gradmem import MemoryConfig, Reader
from gradmem.attention import attention_path
from gradmem.data import Batch
from gradmem.tasks.kv import KVTask, kv_tokenizer
from gradmem.train import ModelConfig, OptimConfig, build_backbone_config, meta_step, mixed_precision
from gradmem.write import write_memory


@dataclass
class Cell:
    """A reader to measure, its batch, and the arithmetic of its meta-step and writes."""

    reader: Reader
    batch: Batch
    autocast: str | None  # bf16 autocast over the weights' dtype, or None
    precision: str  # what the tables call it
    aux_write_loss: float  # the recipe's: 0.5 on key-value, 0 on natural language (the READ loss alone)


def kv_reader(smoke: bool) -> Cell:
    tok = kv_tokenizer()
    torch.manual_seed(0)
    model = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64) if smoke else ModelConfig()
    reader = Reader.from_config(build_backbone_config(model, len(tok), tok), tok,
                                MemoryConfig(num_memory=8, write_steps=2, write_lr=0.04))
    batch = KVTask(4 if smoke else 16).batch(8 if smoke else 64, [0], tok)
    return Cell(reader, batch, None, "fp32", aux_write_loss=0.5)


def smollm2_reader(smoke: bool, whole_bf16: bool = False) -> Cell:
    """SmolLM2-135M's architecture with random weights, on the key-value tokenizer's ids mapped into its vocabulary
    (token values do not change the work; lengths do: contexts of 100 tokens, queries of 5, answers of 4). fp32
    weights under bf16 autocast (the bAbI GPU configuration), or with ``whole_bf16`` the whole model cast to bf16
    and no autocast, as the authors train natural-language readers (``model.dtype: bfloat16``)."""
    tok = kv_tokenizer()
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128) if smoke else dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                                          num_key_value_heads=3, intermediate_size=1536)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **size)
    torch.manual_seed(0)
    reader = Reader.from_config(config, tok, MemoryConfig(num_memory=8, write_steps=2, write_lr=1e-3, mem_proj=True))
    batch = KVTask(14).batch(8 if smoke else 64, [0], tok)  # 14 pairs: 99 context tokens
    if whole_bf16:
        return Cell(reader.to(torch.bfloat16), batch, None, "bf16 weights (whole model)", aux_write_loss=0.0)
    return Cell(reader, batch, "bfloat16", "bf16 autocast, fp32 weights", aux_write_loss=0.0)


READERS = {"kv": kv_reader, "smollm2": smollm2_reader,
           "smollm2_bf16": lambda smoke: smollm2_reader(smoke, whole_bf16=True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class FlopCount(TorchDispatchMode):
    """Adds up the FLOPs of every matrix product and attention op as executed, with PyTorch's own formulas
    (``torch.utils.flop_counter``). A plain dispatch mode: ``FlopCounterMode``'s module tracking installs backward
    hooks that ``torch.autograd.grad`` (the WRITE's inner step) refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            try:
                self.total += formula(*args, **kwargs, out_val=out)
            except AssertionError:  # attention with grouped KV heads, which PyTorch's formula refuses
                self.total += grouped_attention_flops(func, args)
        return out


def grouped_attention_flops(func, args) -> int:
    """Attention FLOPs for (B, H, Lq, D) queries over (B, Hkv, Lk, D) keys: 4 B H Lq Lk D forward (scores and
    values), 2.5x that for a backward op."""
    q, k = args[0], args[1]
    b, h, lq, d = q.shape
    flops = 4 * b * h * lq * k.shape[-2] * d
    return int(2.5 * flops) if "backward" in str(func) else flops


def counted_flops(fn) -> float:
    with FlopCount() as counter:
        fn()
    return float(counter.total)


def cell_calls(name: str, device: torch.device, smoke: bool):
    """(cell, one meta-step, one inference write) of reader ``name`` on ``device``; the reader is trainable until
    the caller freezes it for the writes."""
    cell = READERS[name](smoke)
    reader, batch = cell.reader.to(device).train(), cell.batch.to(device)
    optim = OptimConfig(attention="sdpa_math", autocast=cell.autocast, aux_write_loss=cell.aux_write_loss)
    params = [p for p in reader.parameters() if p.requires_grad]

    def step() -> None:
        loss, _ = meta_step(reader, batch, optim, steps=2, lr=reader.config.write_lr)
        loss.backward()
        for p in params:
            p.grad = None

    def write() -> None:  # an inference write of the frozen reader (first order, fast attention)
        with attention_path(reader.lm, "sdpa"), mixed_precision(device, cell.autocast):
            write_memory(reader, batch.ctx_ids, batch.ctx_mask, 2, reader.config.write_lr, mode="inference")

    return cell, step, write


def bench_reader(name: str, device: torch.device, repeats: int, smoke: bool, peak: float) -> dict:
    """The eager cells of one reader: meta-step and write seconds, their FLOPs as executed, MFU."""
    cell, step, write = cell_calls(name, device, smoke)
    step_s = timed(step, device, repeats)
    step_flops = counted_flops(step)
    extra: dict = {}
    if name == "kv":
        extra["loop_step_s"] = loop_step_seconds(device, smoke, repeats)
    cell.reader.freeze()
    write_s = timed(write, device, repeats)
    write_flops = counted_flops(write)
    contexts = cell.batch.ctx_ids.shape[0]
    return {**extra,
        "reader": name, "params": sum(p.numel() for p in cell.reader.parameters()), "batch": contexts,
        "context_tokens": int(cell.batch.ctx_mask.sum(1).max()), "precision": cell.precision,
        "meta_step_s": step_s, "meta_step_tflop": step_flops / 1e12, "meta_step_mfu": step_flops / step_s / peak,
        "write_s": write_s, "write_contexts_per_s": contexts / write_s, "write_tflop": write_flops / 1e12,
        "write_mfu": write_flops / write_s / peak,
    }


def bench_compiled(eager: dict, device: torch.device, repeats: int, smoke: bool, peak: float) -> dict:
    """The compiled cells of the reader ``eager`` measured (the same weights, batch and arithmetic): the meta-step
    with its WRITE step compiled, then the frozen reader's compiled write; each compile (its first call) reported
    apart, MFU from the eager cells' FLOP counts (the same arithmetic)."""
    cell, step, write = cell_calls(eager["reader"], device, smoke)
    out: dict = {}
    cell.reader.compile_write_step()
    out["meta_step_compile_s"] = first_call_seconds(step, device)
    out["meta_step_compiled_s"] = timed(step, device, repeats)
    out["meta_step_compiled_mfu"] = eager["meta_step_tflop"] * 1e12 / out["meta_step_compiled_s"] / peak
    cell.reader.freeze().compile()
    out["write_compile_s"] = first_call_seconds(write, device)
    out["write_compiled_s"] = timed(write, device, repeats)
    out["write_compiled_mfu"] = eager["write_tflop"] * 1e12 / out["write_compiled_s"] / peak
    return out


def loop_step_seconds(device: torch.device, smoke: bool, repeats: int) -> float:
    """Seconds per optimizer step of the training loop itself (``gradmem.loop`` through ``Trainer``: the batch,
    the meta-step, the metrics read on the host, clipping, AdamW) on the key-value reader, as ``kv_reader`` shapes
    it: what a run pays per step, beside the bare meta-step (host waits and the optimizer are the difference)."""
    import tempfile

    from gradmem.train import TrainConfig, Trainer

    model = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64} if smoke else {}
    cfg = TrainConfig.from_dict({
        "model": model, "memory": {"num_memory": 8, "write_steps": 2, "write_lr": 0.04},
        "task": {"pairs": 4 if smoke else 16},
        "optim": {"batch_size": 8 if smoke else 64, "attention": "sdpa_math", "aux_write_loss": 0.5},
        "run": {"eval_every": 0, "save_every": 0},
    })
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, device=device)
        trainer.reader.train()
        return timed(trainer.loop.train_step, device, repeats)


def first_call_seconds(fn, device: torch.device) -> float:
    """Seconds of one call (the compile, when it is the first call of a compiled path)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_ray(device: torch.device, smoke: bool, docs: int, batch: int, clients: int, seconds: float) -> dict:
    """The Ray parts on the device, each against the same work in-process, in one local Ray:

    - the compression job (``benchmarks.compress.pipeline_cells``: jsonl in, Parquet out) with 1 and 2 writer actors
      sharing the GPU, against in-process writes of the same reader, batch and precision;
    - the query service (``pipelines.serve``, one replica on the GPU, ``@serve.batch`` up to 32 questions) under
      CLIENTS threads for SECONDS: requests/s and latency.

    The paper's key-value reader (N = 16, 113-token contexts, K = 2), bf16 writes on CUDA (float32 on CPU)."""
    import tempfile

    import ray
    from ray import serve

    from benchmarks.common import ROOT
    from benchmarks.compress import pipeline_cells, ratios, reader_dir, write_corpus
    from benchmarks.loadtest_serve import load, store_memories
    from gradmem.runtime import free_port
    from pipelines.serve import build_app

    cuda = device.type == "cuda"
    precision = "bfloat16" if cuda else "float32"
    with tempfile.TemporaryDirectory(prefix="gm-gpu-bench-ray-") as tmp:
        work = Path(tmp)
        path = reader_dir(work / "reader")
        reader = Reader.from_pretrained(path, device=device)
        exs = KVTask(4 if smoke else 16).examples(docs, seed=[0, 0])
        texts = [e.context for e in exs]
        ids = reader.encode_contexts(texts)
        setting = reader.write_setting(precision=precision)
        reader.write_tokens(ids[:batch], setting, batch)  # warm-up
        sync(device)
        start = time.perf_counter()
        memories = reader.write_tokens(ids, setting, batch)
        sync(device)
        out: dict = {"docs": docs, "batch": batch, "precision": precision, "context_tokens": len(ids[0]),
                     "inprocess_batched_ctx_s": docs / (time.perf_counter() - start)}
        corpus = write_corpus(work / "corpus", texts)
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, log_to_driver=False)  # the bench's lines only
        try:
            out.update(pipeline_cells(path, corpus, work, docs, batch, gpus=1.0 if cuda else 0.0, precision=precision))
            doc_ids = store_memories(work / "memories", memories, ids)
            queries = {d: e.query for d, e in zip(doc_ids, exs)}
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options={"grpc_servicer_functions": []})
            try:
                serve.run(build_app({"reader": str(path), "memories": str(work / "memories"), "max_batch_size": 32,
                                     "gpus_per_replica": 1 if cuda else 0}), name="bench", route_prefix="/bench")
                url = f"http://127.0.0.1:{port}/bench/v1/query"
                load(url, doc_ids, queries, clients=2, seconds=2)  # warm the replica's cache and code paths
                out["serve"] = {"clients": clients, "seconds": seconds, **load(url, doc_ids, queries, clients, seconds)}
            finally:
                serve.shutdown()
        finally:
            ray.shutdown()
    out["ratios"] = ratios(out)
    return out


def render_ray(r: dict) -> list[str]:
    s, x = r["serve"], r["ratios"]
    return ["", f"Ray on the device (the key-value reader, {r['docs']} contexts of {r['context_tokens']} tokens, batch "
            f"{r['batch']}, {r['precision']} writes):", "",
            "| cell | contexts/s | against in-process |", "|---|---|---|",
            f"| in-process writes | {r['inprocess_batched_ctx_s']:.0f} | 1.00x |",
            f"| compression job, 1 writer actor (write pass) | {r['ray_1_actor_ctx_s']:.0f} | "
            f"{x['ray_1_actor_over_inprocess']:.2f}x |",
            f"| compression job, 1 writer actor (time in its calls) | {r['ray_1_actor_in_actor_ctx_s']:.0f} | "
            f"{x['in_actor_over_inprocess']:.2f}x |",
            f"| compression job, 2 writer actors sharing the GPU | {r['ray_2_actor_ctx_s']:.0f} | "
            f"{r['ray_2_actor_ctx_s'] / r['inprocess_batched_ctx_s']:.2f}x ({x['ray_2_actors_over_1']:.2f}x 1 actor) |",
            "", f"Query service (one replica, {s['clients']} clients, {s['seconds']:g} s): {s['rps']:.0f} requests/s, "
            f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, {s['errors']} errors."]


def plot(results: list[dict], meta: dict, path: Path) -> None:
    """bench.png: MFU of each measured cell (meta-step and write, eager and compiled, per reader), the issue's
    yardstick against the card's peak."""
    from benchmarks.common import bar_plot

    labels, values = [], []
    for r in results:
        for key, label in (("meta_step_mfu", "meta-step"), ("meta_step_compiled_mfu", "meta-step compiled"),
                           ("write_mfu", "write"), ("write_compiled_mfu", "write compiled")):
            if key in r:
                labels.append(f"{r['reader']} {label}")
                values.append(100 * r[key])
    bar_plot(str(path), labels, values, "MFU (% of peak)",
             f"GradMem on {meta['device']} (peak {meta['peak_tflops']:g} TFLOP/s bf16)")


def render(results: list[dict], meta: dict) -> str:
    lines = [f"# GPU bench ({meta['device']}, torch {meta['torch']}, peak {meta['peak_tflops']:g} TFLOP/s bf16 dense)", "",
             f"Command: `{meta['command']}`; {meta['repeats']} timed calls per figure (median).", "",
             "| reader | params | precision | batch x ctx | meta-step s | TFLOP | MFU | write s | contexts/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['reader']} | {r['params'] / 1e6:.1f}M | {r['precision']} | {r['batch']} x {r['context_tokens']} | "
                     f"{r['meta_step_s']:.4f} | {r['meta_step_tflop']:.3f} | {100 * r['meta_step_mfu']:.2f}% | "
                     f"{r['write_s']:.4f} | {r['write_contexts_per_s']:.0f} | {100 * r['write_mfu']:.2f}% |")
    for r in results:
        if "loop_step_s" in r:
            lines += ["", f"Training loop ({r['reader']}: batch, meta-step, metrics read, clipping, AdamW): "
                      f"{r['loop_step_s']:.4f} s per step, {r['loop_step_s'] / r['meta_step_s']:.2f}x the bare "
                      "meta-step."]
    compiled = [r for r in results if "meta_step_compiled_s" in r]
    if compiled:
        lines += ["", "Compiled paths (MFU from the eager call's FLOPs; compile = the first call):", "",
                  "| reader | meta-step s | vs eager | MFU | compile s | write s | vs eager | MFU | compile s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in compiled:
            lines.append(f"| {r['reader']} | {r['meta_step_compiled_s']:.4f} | {r['meta_step_s'] / r['meta_step_compiled_s']:.2f}x | "
                         f"{100 * r['meta_step_compiled_mfu']:.2f}% | {r['meta_step_compile_s']:.0f} | "
                         f"{r['write_compiled_s']:.4f} | {r['write_s'] / r['write_compiled_s']:.2f}x | "
                         f"{100 * r['write_compiled_mfu']:.2f}% | {r['write_compile_s']:.0f} |")
    if meta.get("ray"):
        lines += render_ray(meta["ray"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--readers", default="kv,smollm2,smollm2_bf16", help=f"comma-separated, of {sorted(READERS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check of the code path)")
    parser.add_argument("--compiled", action="store_true", help="also time the compiled meta-step and write")
    parser.add_argument("--ray", action="store_true", help="also the compression job and the query service on a "
                        "local Ray (needs the [ray] extra)")
    parser.add_argument("--ray-docs", type=int, default=None, help="contexts the compression cells write (default "
                        "8192 on CUDA, 256 elsewhere)")
    parser.add_argument("--clients", type=int, default=32, help="query service: client threads")
    parser.add_argument("--seconds", type=float, default=15.0, help="query service: seconds of load")
    args = parser.parse_args(argv)
    setup_logging()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "peak_tflops": args.peak_tflops, "repeats": args.repeats,
            "command": "python -m benchmarks.gpu_bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    names = [n for n in args.readers.split(",") if n]
    unknown = sorted(set(names) - set(READERS))
    if unknown:
        parser.error(f"unknown readers {unknown}; choose from {sorted(READERS)}")
    results: list[dict] = []

    def save(what: str, started: float, value) -> None:
        """Progress, and every file rewritten after each cell: a run cut short keeps what it measured."""
        print(f"gpu_bench: {what} done in {time.perf_counter() - started:.0f} s: {json.dumps(value)}", flush=True)
        (out / "bench.json").write_text(json.dumps({**meta, "results": results}, indent=2))
        (out / "bench.md").write_text(render(results, meta))
        plot(results, meta, out / "bench.png")

    # the quick cells first (eager, then Ray), the compiles last: a run cut short loses the least
    for name in names:
        started = time.perf_counter()
        results.append(bench_reader(name, device, args.repeats, args.smoke, args.peak_tflops * 1e12))
        save(name, started, results[-1])
    if args.ray:
        started = time.perf_counter()
        docs = args.ray_docs or (8192 if device.type == "cuda" else 256)
        meta["ray"] = bench_ray(device, args.smoke, docs, 256 if device.type == "cuda" else 64, args.clients,
                                args.seconds)
        save("ray cells", started, meta["ray"])
    if args.compiled:
        for r in results:
            started = time.perf_counter()
            r.update(bench_compiled(r, device, args.repeats, args.smoke, args.peak_tflops * 1e12))
            save(f"{r['reader']} compiled", started, r)
    print((out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
