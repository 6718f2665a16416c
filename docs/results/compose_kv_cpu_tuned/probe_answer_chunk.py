"""Probe: which chunk does each trained-with-composition reader answer from? EM split by the answer's chunk.

    cd <a checkout at the commit named in the README> && python docs/results/compose_kv_cpu_tuned/probe_answer_chunk.py \
        --runs <the compose run's output>/runs --json docs/results/compose_kv_cpu_tuned/probe_answer_chunk.json

On the benchmark's own held-out documents (benchmarks/configs/compose_kv_cpu.yaml: eval_seed, 256 documents of
exactly c chunks of one key-value pair), for c in 2, 4, 8 and each c1to4 reader, the composed READ's teacher-forced
EM split by the index j of the chunk holding the queried key. A READ that matches the query's key against every
memory scores alike for every j; one that reads a fixed memory (say the last) scores 100% at that j and about 0
elsewhere, i.e. about 1/c overall: the plateau GradMem's composition cell sat on. Also the mean L2 norm of the READ
prefix rows (the memories as the READ sees them) beside the token embeddings' mean norm, per method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.compose import ComposeConfig, collate_documents, eval_documents, oracle_chunk
from gradmem import methods
from gradmem.attention import attention_path
from gradmem.read import read_teacher_forced
from gradmem.reader import Reader
from gradmem.runtime import configure_cpu
from gradmem.train import TaskConfig

CHUNKS = (2, 4, 8)


@torch.no_grad()
def by_answer_chunk(reader: Reader, cfg: ComposeConfig, c: int) -> dict:
    """EM of the composed READ per answer chunk j (0-based), and the READ rows' mean norm."""
    examples, task = eval_documents(cfg, TaskConfig(name="kv", pairs=1), c)
    batch = collate_documents(task, examples, reader.tokenizer).to(reader.device)
    with attention_path(reader.lm, "sdpa"):
        out = methods.write(reader, batch.ctx_ids, batch.ctx_mask, reader.config.write_steps, reader.config.write_lr,
                            mode="inference")
        read = read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask,
                                   out.lengths, batch.chunks)
        prefix, rows = methods.read_prefix(reader, out.memory, out.lengths)  # (N, P, d), (N,)
    real = torch.arange(prefix.shape[1]) < rows[:, None]  # (N, P)
    where = [oracle_chunk(e) for e in examples]
    em = read.exact_match.float()  # (B,)
    per_j = {}
    for j in range(c):
        pick = torch.tensor([w == j for w in where])
        per_j[str(j)] = {"documents": int(pick.sum()), "em": float(em[pick].mean()) if pick.any() else None}
    return {"em": float(em.mean()), "by_answer_chunk": per_j,
            "prefix_row_norm": float(prefix[real].norm(dim=-1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the compose run's runs/ directory (one reader per cell)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    configure_cpu(threads=1)
    torch.manual_seed(0)
    cfg = ComposeConfig.from_yaml("benchmarks/configs/compose_kv_cpu.yaml")
    results = {}
    for cell in ("gradmem-c1to4", "rmt-c1to4", "full_context-c1to4", "gradmem-c1", "rmt-c1"):
        reader = Reader.from_pretrained(Path(args.runs) / cell / "reader").eval()
        embed_norm = float(reader.lm.get_input_embeddings().weight.norm(dim=-1).mean())
        results[cell] = {"token_embedding_norm": embed_norm,
                         "by_c": {str(c): by_answer_chunk(reader, cfg, c) for c in CHUNKS}}
        for c in CHUNKS:
            r = results[cell]["by_c"][str(c)]
            cols = " ".join(f"{100 * v['em']:5.1f}" if v["em"] is not None else "  -  "
                            for v in r["by_answer_chunk"].values())
            print(f"{cell:20s} c={c}  EM {100 * r['em']:5.1f}  by answer chunk j: {cols}  "
                  f"| row norm {r['prefix_row_norm']:.2f} (tokens {embed_norm:.2f})")
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
