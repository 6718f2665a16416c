"""READ: answer from ``[M; Q]`` alone, by teacher forcing (training, metrics) or greedily (serving).

``M`` is whatever ``gradmem.methods.read_prefix`` makes of the memory for the reader's method: m projected
vectors (gradmem, rmt), the context's own embeddings (full_context) or nothing (no_context).

A document written as c chunks is read through all its memories at once: ``M = [M_1; ...; M_c]`` (``compose``),
each memory's rows as the method makes them, in chunk order. The single-memory READ is the case c = 1 of the same
code (no ``chunks``, or every count 1, passes the prefix through untouched).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from gradmem import methods
from gradmem.cell import per_sample_mean

if TYPE_CHECKING:
    from gradmem.cell import MemoryCell


@dataclass
class ReadOutput:
    loss: torch.Tensor  # (B,) mean cross-entropy over each sample's target tokens (with graph)
    token_accuracy: torch.Tensor  # (B,) teacher-forced argmax accuracy on target tokens
    exact_match: torch.Tensor  # (B,) 1.0 where every scored target token is right


def read_teacher_forced(
    reader: "MemoryCell",
    memory: torch.Tensor,  # (B, P, d) as written (P = m for gradmem and rmt)
    read_ids: torch.Tensor,  # (B, L) query then target, right-padded
    target_mask: torch.Tensor,  # (B, L)
    score_mask: torch.Tensor | None = None,  # (B, L) subset of target_mask counted by exact match
    lengths: torch.Tensor | None = None,  # (N,) real memory rows (WriteOutput.lengths); full_context needs it
    chunks: torch.Tensor | None = None,  # (B,) memories per document (Batch.chunks); None: one each (N = B)
) -> ReadOutput:
    """Teacher-forced READ of each document's query and target after its (composed) memories. ``memory`` holds
    N memories (N, P, d), each document's in order (B documents, N = sum of ``chunks``)."""
    batch = read_ids.shape[0]
    prefix, prefix_len = compose(*methods.read_prefix(reader, memory, lengths), chunks)  # (B, R, d), (B,)
    longest = int(prefix_len.max()) + read_ids.shape[1] - 1 if batch else 0  # positions of the longest input
    if longest > reader.max_positions:
        raise ValueError(f"a READ of {int(prefix_len.max())} memory rows + {read_ids.shape[1]} tokens exceeds the "
                         f"backbone's {reader.max_positions} positions: fewer or shorter chunks per document")
    hidden = prefixed_hidden(reader, prefix, prefix_len, read_ids, target_mask)  # (B, L, d): row t predicts token t
    ce, correct, rows = reader.token_losses(hidden, read_ids, target_mask, reader.lm.get_output_embeddings())
    loss = per_sample_mean(ce, rows, batch)
    token_accuracy = per_sample_mean(correct.float().detach(), rows, batch)
    scored = (score_mask if score_mask is not None else target_mask)[target_mask.bool()].bool()  # (n,)
    wrong = torch.zeros(batch, device=ce.device).index_add_(0, rows, (scored & ~correct).float())
    return ReadOutput(loss=loss, token_accuracy=token_accuracy, exact_match=(wrong == 0).float())


def compose(
    prefix: torch.Tensor,  # (N, P, d) each memory's READ rows in input-embedding space (methods.read_prefix)
    rows: torch.Tensor,  # (N,) real rows of each
    chunks: torch.Tensor | None,  # (B,) memories per document, in order; None: one each (N = B)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The composed READ prefix of each document, ``[M_1[:n_1]; ...; M_c[:n_c]]`` (B, R, d), and its rows (B,).

    Only real rows are concatenated (full_context: the chunks' tokens, so the READ sees the whole document's
    ``[C_1; ...; C_c; Q]``, exactly the plain LM on it; no_context: nothing), and the result is right-padded per
    document, so ``prefixed_hidden`` and ``greedy_generate`` pack it as they pack a single memory: no pad sits
    before a real row.

    Positions: plain consecutive positions over the whole prefix (memory j's rows after memory j-1's, the query
    after the last), the positions the backbone gives any sequence. Why this and not every memory at the same
    positions (parallel-context style, which would keep the query's position fixed as c grows):
    - order is information: bAbI's answer is the latest relevant fact, which may sit in any chunk, and with
      consecutive positions RoPE (and GPT-2's absolute positions) tell the READ which memory came later;
    - the full-context bound then is exactly the backbone on the concatenated document, the same rule for every
      method, and c = 1 is today's READ bit for bit;
    - it needs no position ids in the teacher-forced path and no change to any backbone call;
    - what it costs: the query moves to position sum(n_j), further than a reader trained at c = 1 has seen, which
      is why the READ is trained with c drawn from a range (``task.chunks``); composing memories trained one at a
      time is the untrained baseline to measure against (issue 15, item 3).
    Measured once (a throwaway probe, its script not kept in the repository: 512 key-value documents of c chunks of 1 pair, teacher-forced EM; kv_tiny's reader):
    trained at c = 1 only (300 steps), composing c = 2 / 3 / 4 memories gave 43 / 25 / 7% with consecutive
    positions against 27 / 11 / 5% with every memory at positions 0..m-1; trained with c in [1, 3] (1500 steps) the
    two agreed within noise (50 / 30 / 21% and 50 / 31 / 19%), both still on the 1-in-c plateau a key-matching
    READ leaves only with longer training (the method notes' N > 1 probes). So consecutive is no worse, and better
    untrained.
    The prefix must fit the backbone's positions with the query (``Reader.check_questions`` says so when it does
    not)."""
    if chunks is None:
        return prefix, rows
    chunks = chunks.to(device=rows.device, dtype=torch.long)
    totals = chunk_totals(rows, chunks)  # (B,)
    if bool((chunks == 1).all()):
        return prefix, rows  # c = 1: the single-memory READ, the same tensors
    real = torch.arange(prefix.shape[1], device=rows.device) < rows[:, None]  # (N, P)
    flat = prefix[real]  # (sum n_j, d): memory after memory, so document after document
    composed = pad_sequence(list(flat.split(totals.tolist())), batch_first=True)  # (B, max R_b, d)
    return composed, totals


def chunk_totals(rows: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """(B,) prefix rows of each document: the sum of its memories' rows (N,), ``chunks`` (B,) memories each.
    A ValueError when the counts do not cover the memories exactly or a document has none."""
    if chunks.dim() != 1 or bool((chunks < 1).any()):
        raise ValueError(f"every document needs at least one memory, got chunk counts {chunks.tolist()}")
    if int(chunks.sum()) != rows.shape[0]:
        raise ValueError(f"chunk counts {chunks.tolist()} add up to {int(chunks.sum())}, not to the "
                         f"{rows.shape[0]} memories given")
    document = torch.repeat_interleave(torch.arange(chunks.shape[0], device=rows.device), chunks)  # (N,)
    return torch.zeros(chunks.shape[0], dtype=torch.long, device=rows.device).index_add_(0, document, rows.long())


def prefixed_hidden(
    reader: "MemoryCell",
    prefix: torch.Tensor,  # (B, P, d) input embeddings
    lengths: torch.Tensor,  # (B,) real prefix rows per sample
    ids: torch.Tensor,  # (B, L) right-padded
    target_mask: torch.Tensor,  # (B, L) tokens that will be scored
) -> torch.Tensor:
    """(B, L, d): row t is the last hidden state at the position that predicts ``ids[:, t]`` after the prefix.

    When every sample has the whole prefix (gradmem, rmt) it is one concatenation. Otherwise each sample is packed
    as ``[prefix_i[:n_i]; ids_i]`` and only then right-padded, so no pad ever precedes a real token and no
    attention mask is needed. Token 0 has no predecessor when the prefix is empty (no_context): it must not be
    scored (the query always comes first)."""
    batch, slots, d = prefix.shape
    tokens = reader.lm.get_input_embeddings()(ids[:, :-1])  # (B, L - 1, d); the last token predicts nothing
    prefix = prefix.to(tokens.dtype)
    if slots > 0 and bool((lengths == slots).all()):
        hidden = reader.last_hidden(torch.cat([prefix, tokens], dim=1))  # (B, P + L - 1, d)
        return hidden[:, slots - 1 :]  # (B, L, d): position P-1+t predicts token t
    if bool((target_mask[:, 0].bool() & (lengths == 0)).any()):
        raise ValueError("a READ with no prefix cannot score its first token (nothing predicts it): "
                         "every query needs at least one token")
    seqs = [torch.cat([prefix[i, :n], tokens[i]]) for i, n in enumerate(lengths.tolist())]  # (n_i + L - 1, d)
    hidden = reader.last_hidden(pad_sequence(seqs, batch_first=True))  # (B, max n_i + L - 1, d)
    index = lengths[:, None] - 1 + torch.arange(ids.shape[1], device=lengths.device)  # (B, L) predicting position
    gathered = hidden.gather(1, index.clamp(min=0).unsqueeze(-1).expand(-1, -1, d))  # (B, L, d)
    return gathered.masked_fill((index < 0).unsqueeze(-1), 0.0)  # token 0 after an empty prefix: never scored


@torch.no_grad()
def greedy_generate(
    reader: "MemoryCell",
    prefix: torch.Tensor,  # (B, P, d) READ prefix in input-embedding space (methods.read_prefix)
    lengths: torch.Tensor,  # (B,) real prefix rows per sample
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
    batch = prefix.shape[0]
    device = prefix.device
    embed = reader.lm.get_input_embeddings()
    n_prefix = lengths.tolist()
    width = max(n + len(q) for n, q in zip(n_prefix, queries))
    if min(n + len(q) for n, q in zip(n_prefix, queries)) == 0:
        raise ValueError("cannot answer from an empty prompt: with no memory rows the question needs a token")
    embeds = torch.zeros(batch, width, prefix.shape[-1], dtype=embed.weight.dtype, device=device)  # (B, T, d)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)  # (B, T)
    for i, q in enumerate(queries):
        q_embeds = embed(torch.as_tensor(list(q), dtype=torch.long, device=device))  # (|q|, d)
        seq = torch.cat([prefix[i, : n_prefix[i]].to(embeds.dtype), q_embeds], dim=0)  # (n_i + |q|, d)
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
