"""Speed of the GradMem core, each figure next to a naive implementation measured in the same run.

    python -m benchmarks.core                      # all cells, about 3 minutes on 2 CPU cores
    python -m benchmarks.core --repeats 5 --json bench.json

Cells (the paper's key-value reader: 4 layers, d = 128, 8 memory vectors, batch 64, K = 2):
- meta-training step time (second order, write + read + backward) at N = 8 and N = 16;
- inference-write throughput (contexts/s) at N = 16, for each attention path (what fast kernels buy), and
  with ``Reader.compile()`` (torch.compile of the backbone; its one-off compile time is printed apart).

"naive" is the straightforward implementation: the full causal-LM forward with an attention mask, logits for
every position from all hidden states, eager attention, and (for inference) weights that still require grad.
Timings are medians over --repeats after a warm-up; machines are shared and noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.common import bar_plot, paper_reader, setup_logging, timed
from gradmem import Reader
from gradmem.attention import attention_path
from gradmem.tasks.kv import KVTask
from gradmem.train import OptimConfig, meta_step
from gradmem.write import write_memory

# The authors' reference implementation measured on the 2-core CPU machine kind of docs/results/benchmark_core.txt (a
# meta-training step at N = 8 and N = 16; write + read at N = 16, contexts/s), for orientation only.
REFERENCE = {"train_step_s": {8: 1.4, 16: 2.9}, "eval_contexts_per_s": {16: 75.0}}


# ------------------------------------------------------------------------------------------ naive versions
def naive_loss(reader: Reader, memory, ids, mask, head) -> torch.Tensor:
    """Per-sample mean CE the straightforward way: full LM forward with a mask, every position projected."""
    m = memory.shape[1]
    embeds = torch.cat([reader.project(memory), reader.lm.get_input_embeddings()(ids)], dim=1)
    attn = torch.cat([torch.ones(ids.shape[0], m, dtype=mask.dtype), mask], dim=1)
    out = reader.lm(inputs_embeds=embeds, attention_mask=attn, output_hidden_states=True)
    logits = head(out.hidden_states[-1])[:, m - 1 : -1]  # (B, L, V)
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # (B, L)
    return (ce * mask).sum(1) / mask.sum(1)


def naive_write(reader, batch, steps, lr, create_graph):
    memory = reader.memory.unsqueeze(0).expand(len(batch), -1, -1)
    if not create_graph:
        memory = memory.detach()
    last = None
    for _ in range(steps):
        if not memory.requires_grad:
            memory = memory.requires_grad_(True)
        last = naive_loss(reader, memory, batch.ctx_ids, batch.ctx_mask, reader.write_head)
        (grad,) = torch.autograd.grad(last.sum(), memory, create_graph=create_graph, retain_graph=create_graph)
        memory = memory - lr * grad if create_graph else (memory - lr * grad).detach()
    return memory, last


def naive_train_step(reader, batch):
    with attention_path(reader.lm, "eager"):
        memory, last = naive_write(reader, batch, 2, 0.04, create_graph=True)
        read = naive_loss(reader, memory, batch.read_ids, batch.target_mask, reader.lm.get_output_embeddings())
        loss = read.mean() + 0.5 * last.mean()
    reader.zero_grad(set_to_none=True)
    loss.backward()


def naive_inference_write(reader, batch):
    with attention_path(reader.lm, "eager"):
        memory, _ = naive_write(reader, batch, 2, 0.04, create_graph=False)
        with torch.no_grad():
            naive_loss(reader, memory, batch.ctx_ids, batch.ctx_mask, reader.write_head)  # final statistics


# ------------------------------------------------------------------------------------------ ours
def train_step(reader, batch):
    loss, _ = meta_step(reader, batch, OptimConfig(attention="sdpa_math", aux_write_loss=0.5), steps=2, lr=0.04)
    reader.zero_grad(set_to_none=True)
    loss.backward()


def inference_write(reader, batch, path):
    with attention_path(reader.lm, path):
        write_memory(reader, batch.ctx_ids, batch.ctx_mask, 2, 0.04, mode="inference")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="write a PNG of the figures here")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, K = 2, m = 8, d = 128")
    results: dict = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "train": {}, "inference": {}}

    reader = paper_reader().train()
    print("\nmeta-training step (second order), seconds per step")
    print(f"{'N':>4} {'naive':>8} {'ours':>8} {'speed-up':>9} {'reference':>10} {'vs ref':>7}")
    for pairs in (8, 16):
        batch = KVTask(pairs).batch(args.batch_size, [0, pairs], reader.tokenizer)
        naive = timed(lambda: naive_train_step(reader, batch), args.repeats)
        ours = timed(lambda: train_step(reader, batch), args.repeats)
        ref = REFERENCE["train_step_s"][pairs]
        results["train"][pairs] = {"naive_s": naive, "ours_s": ours, "speedup": naive / ours, "reference_s": ref}
        print(f"{pairs:>4} {naive:>8.3f} {ours:>8.3f} {naive / ours:>8.2f}x {ref:>10.2f} {ref / ours:>6.2f}x")

    print("\ninference write at N = 16 (K = 2, with final statistics), contexts per second")
    batch = KVTask(16).batch(args.batch_size, [0, 16], reader.tokenizer)
    naive = args.batch_size / timed(lambda: naive_inference_write(reader, batch), args.repeats)
    results["inference"]["naive"] = naive
    print(f"{'naive (weights require grad, eager, full logits)':<52} {naive:>8.1f}")
    reader.freeze()
    ref = REFERENCE["eval_contexts_per_s"][16]
    for path in ("eager", "sdpa_math", "sdpa"):
        rate = args.batch_size / timed(lambda: inference_write(reader, batch, path), args.repeats)
        results["inference"][path] = rate
        print(f"{'ours, attention ' + path:<52} {rate:>8.1f}  {rate / naive:5.2f}x naive  {rate / ref:5.2f}x reference")
    start = time.perf_counter()
    reader.compile()
    inference_write(reader, batch, "sdpa")  # compiles
    compile_s = time.perf_counter() - start
    rate = args.batch_size / timed(lambda: inference_write(reader, batch, "sdpa"), args.repeats)
    results["inference"]["sdpa_compiled"], results["compile_s"] = rate, compile_s
    print(f"{'ours, attention sdpa, reader.compile()':<52} {rate:>8.1f}  {rate / naive:5.2f}x naive  "
          f"{rate / ref:5.2f}x reference  (compiled once in {compile_s:.0f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        cells = ("naive", "eager", "sdpa_math", "sdpa", "sdpa_compiled")
        labels = ["naive"] + [f"ours ({p})" for p in cells[1:]]
        bar_plot(args.plot, labels, [results["inference"][k] for k in cells],
                 "contexts / s", f"inference write, N = 16, batch {args.batch_size}, K = 2 ({results['threads']} threads)")
    return results


if __name__ == "__main__":
    main()
