"""READ: answer from ``[M; Q]`` alone, by teacher forcing (training, metrics) or greedily (serving)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from gradmem.reader import Reader


@dataclass
class ReadOutput:
    loss: torch.Tensor  # (B,) mean cross-entropy over each sample's target tokens (with graph)
    token_accuracy: torch.Tensor  # (B,) teacher-forced argmax accuracy on target tokens
    exact_match: torch.Tensor  # (B,) 1.0 where every scored target token is right


def read_teacher_forced(
    reader: "Reader",
    memory: torch.Tensor,  # (B, m, d)
    read_ids: torch.Tensor,  # (B, L) query then target, right-padded
    target_mask: torch.Tensor,  # (B, L)
    score_mask: torch.Tensor | None = None,  # (B, L) subset of target_mask counted by exact match
) -> ReadOutput:
    batch = read_ids.shape[0]
    m = memory.shape[1]
    hidden = reader.hidden(memory, read_ids[:, :-1])[:, m - 1 :]  # (B, L, d): position m-1+t predicts token t
    ce, correct, rows = reader.token_losses(hidden, read_ids, target_mask, reader.lm.get_output_embeddings())
    loss = per_sample_mean(ce, rows, batch)
    token_accuracy = per_sample_mean(correct.float().detach(), rows, batch)
    scored = (score_mask if score_mask is not None else target_mask)[target_mask.bool()].bool()  # (n,)
    wrong = torch.zeros(batch, device=ce.device).index_add_(0, rows, (scored & ~correct).float())
    return ReadOutput(loss=loss, token_accuracy=token_accuracy, exact_match=(wrong == 0).float())


def per_sample_mean(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean of flat per-token ``values`` (n,) grouped by sample index ``rows`` (n,) -> (B,)."""
    total = torch.zeros(batch, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    count = torch.zeros(batch, dtype=values.dtype, device=values.device).index_add(0, rows, torch.ones_like(values))
    return total / count.clamp(min=1)


@torch.no_grad()
def greedy_generate(
    reader: "Reader",
    memory: torch.Tensor,  # (B, m, d)
    queries: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    head: "torch.nn.Module | None" = None,
) -> list[list[int]]:
    """Greedy decoding after ``[M; Q]`` with a KV cache.

    Prompts are left-padded so every sample's next token sits in the last column; position ids count from the
    first real position, so a padded sample sees exactly the positions it would see alone. ``head`` replaces
    the LM head (the write head, to check what a memory reconstructs); queries may then be empty.
    """
    batch, m, _ = memory.shape
    device = memory.device
    embed = reader.lm.get_input_embeddings()
    prefix = reader.project(memory)  # (B, m, d)
    width = m + max(len(q) for q in queries)
    embeds = torch.zeros(batch, width, prefix.shape[-1], dtype=embed.weight.dtype, device=device)  # (B, T, d)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)  # (B, T)
    for i, q in enumerate(queries):
        q_embeds = embed(torch.as_tensor(list(q), dtype=torch.long, device=device))  # (|q|, d)
        seq = torch.cat([prefix[i].to(embeds.dtype), q_embeds], dim=0)  # (m + |q|, d)
        embeds[i, width - seq.shape[0] :] = seq
        mask[i, width - seq.shape[0] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)

    model = reader.lm if head is None else reader.lm.base_model

    def next_token(out) -> torch.Tensor:  # (B,)
        if head is None:
            return out.logits[:, -1].argmax(-1)
        return head(out.last_hidden_state[:, -1]).argmax(-1)

    extra = {"logits_to_keep": 1} if head is None else {}
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        next_ids = next_token(out)  # (B,)
        for i, tok in enumerate(next_ids.tolist()):
            if not done[i]:
                generated[i].append(tok)
                done[i] = tok in stop_ids
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)  # (B, T + step + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        out = model(
            input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
            cache=out.cache, use_cache=True,
        )
    return generated
