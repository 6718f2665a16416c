"""Baselines behind the one writer/reader interface: RMT forward writes, full context, no context.

What is checked: the method is a validated, saved config field; RMT writes are per-sample and trainable end
to end; the full-context READ is exactly the plain LM on ``[C; Q]`` and the no-context READ the plain LM on
``[Q]``; hooks on the backbone prove that no context token reaches a READ except through full_context; each
baseline trains through the same ``Trainer`` / ``meta_step`` and beats the no-context reader.
"""

from __future__ import annotations

import contextlib
import json
from typing import Iterator

import pytest
import torch

from gradmem import MemoryConfig, Reader, methods
from gradmem.data import Example, collate
from gradmem.read import read_teacher_forced
from gradmem.tasks.kv import UNSCORED, KVTask, exact_match
from gradmem.train import TrainConfig, Trainer, evaluate, meta_step
from conftest import make_reader

BASELINES = ("rmt", "full_context", "no_context")
ALL_METHODS = ("gradmem",) + BASELINES

# Upper-case letters W-Z appear only in the contexts, never in a query or a target: if a READ input ever holds
# one of their embeddings, context reached the READ.
EXAMPLES = [
    Example(context="!ab:cd!!WX:YZ!|", query="?!ab:", target="cd!|"),
    Example(context="!ef:gh!|", query="?!ef:", target="gh!|"),
    Example(context="!ij:kl!!XW:ZY!!mn:op!|", query="?!mn:", target="op!|"),
]
CONTEXT_ONLY = "WXYZ"


# ------------------------------------------------------------------------------------------ config and checkpoint
def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'rnn'"):
        MemoryConfig(method="rnn")
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig.from_dict({"memory": {"method": "Full_Context"}})
    reader = make_reader("llama", method="rmt")
    reader.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["gradmem"]["memory"]["method"] = "oracle"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown method 'oracle'"):
        Reader.from_pretrained(tmp_path)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_round_trips_through_the_checkpoint(method, tmp_path):
    reader = make_reader("gpt2", method=method)
    reader.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["gradmem"]["memory"]["method"] == method
    loaded = Reader.from_pretrained(tmp_path)
    assert loaded.config.method == method and loaded.fingerprint == reader.fingerprint
    contexts, questions = [e.context for e in EXAMPLES], [e.query for e in EXAMPLES]
    assert loaded.answer(loaded.write(contexts), questions, 4) == reader.answer(reader.write(contexts), questions, 4)


def test_old_checkpoints_default_to_gradmem_and_keep_their_fingerprint(tmp_path):
    """Readers saved before the method field existed load as GradMem with the fingerprint they were saved with."""
    reader = make_reader("llama")
    before = reader.fingerprint
    reader.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["gradmem"]["memory"]["method"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Reader.from_pretrained(tmp_path)  # also checks the stored fingerprint
    assert loaded.config.method == "gradmem" and loaded.fingerprint == before


def test_memories_of_another_method_are_refused():
    """Same weights, different method: the fingerprints differ, so memories cannot be mixed up."""
    gradmem, rmt = make_reader("llama", method="gradmem"), make_reader("llama", method="rmt")
    assert gradmem.fingerprint != rmt.fingerprint
    with pytest.raises(ValueError, match="written by reader"):
        rmt.answer(gradmem.write(["!ab:cd!|"]), ["?!ab:"])


def test_only_gradmem_needs_the_double_backward_attention_path():
    for method in ALL_METHODS:
        data = {"memory": {"method": method}, "optim": {"attention": "sdpa"}}
        if method == "gradmem":
            with pytest.raises(ValueError, match="second-order"):
                TrainConfig.from_dict(data)
        else:
            TrainConfig.from_dict(data)  # forward writes and the bounds train with any attention path


# ------------------------------------------------------------------------------------------ the writers
def test_rmt_batched_write_equals_per_sample(arch, kv_batch):
    examples, batch = kv_batch
    reader = make_reader(arch, method="rmt").eval()
    together = methods.write(reader, batch.ctx_ids, batch.ctx_mask, steps=3, lr=0.0, mode="inference")  # lr: GradMem only
    assert together.memory.shape == (6, reader.num_memory, reader.d_model)
    assert together.losses.shape == (6, 4) and together.accuracy.shape == (6,)
    for i, ex in enumerate(examples):
        ids = batch.ctx_ids[i : i + 1, : len(ex.context)]
        alone = methods.write(reader, ids, torch.ones_like(ids), steps=3, lr=0.0, mode="inference")
        assert (together.memory[i] - alone.memory[0]).abs().max() < 1e-5
        assert torch.allclose(together.losses[i], alone.losses[0], atol=1e-5)
    mem = reader.write([ex.context for ex in examples], steps=3, batch_size=4)  # reordered by length, re-padded
    assert (mem.tensor - together.memory).abs().max() < 1e-5
    assert (mem.stats.losses - together.losses).abs().max() < 1e-5


def test_rmt_passes_are_forward_writes_of_the_trailing_slots():
    """One pass by hand: [M0; C; M0] through the backbone, the last hidden states at the trailing m slots."""
    reader = make_reader("llama", method="rmt").eval()
    ids = torch.tensor([reader.tokenizer.convert_tokens_to_ids(list("!ab:cd!|"))])
    m = reader.num_memory
    with torch.no_grad():
        embeds = reader.lm.get_input_embeddings()(ids)  # (1, 8, d)
        m0 = reader.memory[None]  # (1, m, d)
        expected = reader.lm.model(inputs_embeds=torch.cat([m0, embeds, m0], dim=1)).last_hidden_state[:, -m:]
        one = methods.write(reader, ids, torch.ones_like(ids), steps=1, lr=0.0, mode="inference")
        zero = methods.write(reader, ids, torch.ones_like(ids), steps=0, lr=0.0, mode="inference")
    assert torch.allclose(one.memory, expected, atol=1e-6)
    assert torch.equal(zero.memory, m0)  # K = 0 leaves M0
    assert one.last_step_loss is None and not one.memory.requires_grad


def test_rmt_trains_end_to_end_through_every_pass():
    reader = make_reader("llama", method="rmt")
    cfg = TrainConfig.from_dict({"optim": {"write_mode": "first_order"}})
    batch = KVTask(2).batch(8, 0, reader.tokenizer)
    loss, metrics = meta_step(reader, batch, cfg.optim, steps=3, lr=0.5)
    loss.backward()
    assert {"loss", "read_loss", "em", "token_acc"} <= set(metrics)
    untouched = [n for n, p in reader.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert untouched == ["write_head.weight"], untouched  # RMT's objective has no write loss
    # M0 reaches the READ only through all three passes, so its gradient proves the graph spans them
    assert reader.memory.grad.abs().sum() > 0


def test_bound_writers_store_the_context_or_nothing():
    reader = make_reader("llama", method="full_context")
    contexts = [e.context for e in EXAMPLES]
    mem = reader.write(contexts)
    embed = reader.lm.get_input_embeddings().weight
    assert mem.tensor.shape == (3, reader.max_context_tokens, reader.d_model)  # one shape for every memory
    for i, text in enumerate(contexts):
        ids = reader.tokenizer.convert_tokens_to_ids(list(text))
        assert mem.stats.n_tokens[i] == len(ids)
        assert torch.equal(mem.tensor[i, : len(ids)], embed[ids].detach())
        assert not mem.tensor[i, len(ids) :].any()
    assert mem.stats.losses.shape == (3, 0) and mem.stats.accuracy.tolist() == [1.0, 1.0, 1.0]

    none = make_reader("llama", method="no_context").write(contexts)
    assert none.tensor.shape == (3, 0, reader.d_model)
    assert none.stats.losses.shape == (3, 0) and none.stats.accuracy.tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------ the READ
def _plain_lm_target_loss(reader: Reader, prompt: str, target: str) -> torch.Tensor:
    """Mean cross-entropy of ``target`` after ``prompt`` by the plain language model, fed token ids."""
    tok = reader.tokenizer
    p_ids, t_ids = tok.convert_tokens_to_ids(list(prompt)), tok.convert_tokens_to_ids(list(target))
    logits = reader.lm(input_ids=torch.tensor([p_ids + t_ids])).logits[0]  # (T, V)
    predicted = logits[len(p_ids) - 1 : -1]  # (|target|, V)
    return torch.nn.functional.cross_entropy(predicted, torch.tensor(t_ids))


@pytest.mark.parametrize("method, prompt", [("full_context", "{context}{query}"), ("no_context", "{query}")])
def test_bound_reads_are_the_plain_lm_on_their_prompt(arch, method, prompt):
    """The full-context READ is exactly the LM on [C; Q]; the no-context READ exactly the LM on [Q]; batched,
    padded and packed as they are, teacher-forced and greedy."""
    reader = make_reader(arch, method=method).eval()
    batch = collate(EXAMPLES, reader.tokenizer, unscored=UNSCORED)
    with torch.no_grad():
        out = methods.write(reader, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="inference")
        read = read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask, out.lengths)
        for i, e in enumerate(EXAMPLES):
            expected = _plain_lm_target_loss(reader, prompt.format(context=e.context, query=e.query), e.target)
            assert torch.allclose(read.loss[i], expected, atol=1e-5), (i, read.loss[i], expected)

    answers = reader.answer(reader.write([e.context for e in EXAMPLES]), [e.query for e in EXAMPLES], max_new_tokens=5)
    for e, answer in zip(EXAMPLES, answers):
        ids = reader.tokenizer.convert_tokens_to_ids(list(prompt.format(context=e.context, query=e.query)))
        with torch.no_grad():
            generated = reader.lm.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                           pad_token_id=reader.tokenizer.pad_token_id)[0, len(ids) :]
        assert answer == reader._decode_answer(generated.tolist())


@contextlib.contextmanager
def backbone_inputs(reader: Reader) -> Iterator[list[torch.Tensor]]:
    """Record every input row the backbone receives, as input embeddings (ids are looked up in the table)."""
    rows: list[torch.Tensor] = []
    table = reader.lm.get_input_embeddings().weight

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if ids is not None:
            rows.append(table[ids].detach().reshape(-1, table.shape[1]))
        if embeds is not None:
            rows.append(embeds.detach().reshape(-1, table.shape[1]))

    handle = reader.lm.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def _context_rows_seen(reader: Reader, rows: list[torch.Tensor]) -> set[str]:
    """Which context-only characters have their exact embedding among the recorded input rows."""
    if not rows:
        return set()
    seen = torch.cat(rows)  # (n, d)
    table = reader.lm.get_input_embeddings().weight.detach()
    found = set()
    for ch in CONTEXT_ONLY:
        row = table[reader.tokenizer.convert_tokens_to_ids(ch)]
        if ((seen - row).abs().max(dim=1).values < 1e-7).any():
            found.add(ch)
    return found


@pytest.mark.parametrize("method", ALL_METHODS)
def test_no_context_token_reaches_a_read_except_in_full_context(arch, method):
    reader = make_reader(arch, method=method)
    batch = collate(EXAMPLES, reader.tokenizer, unscored=UNSCORED)
    # the write does see the context (except no_context, which ignores it): the check below can fire
    with backbone_inputs(reader) as rows:
        out = methods.write(reader, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="first_order")
    assert _context_rows_seen(reader, rows) == (set() if method in ("full_context", "no_context") else set(CONTEXT_ONLY))

    expected = set(CONTEXT_ONLY) if method == "full_context" else set()
    with backbone_inputs(reader) as rows:  # teacher-forced READ, as meta_step and evaluate run it
        read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask, out.lengths)
    assert _context_rows_seen(reader, rows) == expected

    memories = reader.write([e.context for e in EXAMPLES])
    with backbone_inputs(reader) as rows:  # greedy READ, as serving runs it
        reader.answer(memories, [e.query for e in EXAMPLES], max_new_tokens=4)
    assert _context_rows_seen(reader, rows) == expected
    n_prompt = {"gradmem": reader.num_memory, "rmt": reader.num_memory, "no_context": 0,
                "full_context": max(len(e.context) for e in EXAMPLES)}[method] + 5  # + the 5-token query
    assert rows[0].shape[0] == len(EXAMPLES) * n_prompt  # the first (prefill) call: prefix + query, no more


def test_answers_batched_equal_answers_alone_for_every_method(arch):
    for method in BASELINES:
        reader = make_reader(arch, method=method)
        mem = reader.write([e.context for e in EXAMPLES])
        together = reader.answer(mem, [e.query for e in EXAMPLES], max_new_tokens=5)
        alone = [reader.answer(mem[i], [e.query], max_new_tokens=5)[0] for i, e in enumerate(EXAMPLES)]
        assert together == alone, method


@pytest.mark.parametrize("method", ["rmt", "full_context"])
def test_baseline_memories_round_trip_the_record_format(method):
    """Stored like GradMem's (no_context memories have no rows, which Arrow's fixed-shape tensors cannot hold;
    there is nothing to store for the lower bound)."""
    from gradmem import records

    reader = make_reader("llama", method=method)
    texts = [e.context for e in EXAMPLES]
    mem = reader.write(texts)
    ids = [reader.tokenizer.convert_tokens_to_ids(list(t)) for t in texts]
    doc_ids, loaded = records.from_table(records.to_table(mem, ["a", "b", "c"], ids), reader.fingerprint)
    assert doc_ids == ["a", "b", "c"] and torch.equal(loaded.tensor, mem.tensor)
    questions = [e.query for e in EXAMPLES]
    assert reader.answer(loaded, questions, max_new_tokens=4) == reader.answer(mem, questions, max_new_tokens=4)


def test_evaluate_runs_every_method():
    for method in BASELINES:
        reader = make_reader("llama", method=method)
        result = evaluate(reader, KVTask(2), samples=8, steps_list=[1, 2], lr=0.5, batch_size=4)
        assert set(result) == {1, 2} and 0.0 <= result[2]["em"] <= 1.0
        assert (result[2]["write_loss"] == result[2]["write_loss"]) == (method == "rmt")  # NaN for the bounds


# ------------------------------------------------------------------------------------------ training
def tiny_config(method: str, max_steps: int) -> TrainConfig:
    """One layer and batch 16: RMT's forward writes sit on a plateau (the READ ignores memory) before they take
    off, and a one-layer backbone leaves it soonest. With this seed EM rises from step ~600 (0.98 at 1000); the
    rise comes at a seed-dependent step (4 of 5 seeds tried reached EM > 0.1 within 1000 steps)."""
    return TrainConfig.from_dict({
        "model": {"arch": "llama", "hidden_size": 64, "num_layers": 1, "num_heads": 4, "intermediate_size": 256,
                  "max_positions": 128, "seed": 0},
        "memory": {"num_memory": 4, "write_steps": 2, "write_lr": 0.5, "method": method},
        "task": {"pairs": 1},
        "optim": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "max_steps": max_steps, "attention": "sdpa"},
        "run": {"log_every": 100, "eval_every": 0, "eval_samples": 256, "save_every": 0},
    })


@pytest.fixture(scope="module")
def no_context_em(tmp_path_factory) -> float:
    """The lower bound every baseline must beat, trained on the same task (chance is 1/3844)."""
    trainer = Trainer(tiny_config("no_context", max_steps=500), tmp_path_factory.mktemp("no_context"))
    trainer.fit()
    em = trainer.evaluate()[2]["em"]
    assert em < 0.02, em
    return em


@pytest.mark.parametrize("method, max_steps, floor", [("full_context", 500, 0.6), ("rmt", 1000, 0.3)])
def test_baseline_trains_and_beats_no_context(method, max_steps, floor, no_context_em, tmp_path):
    trainer = Trainer(tiny_config(method, max_steps), tmp_path)
    export = trainer.fit()
    em = trainer.evaluate()[2]["em"]
    assert em > no_context_em + floor, (em, no_context_em)
    # the exported reader keeps its method and answers greedily through the one string API
    reader = Reader.from_pretrained(export)
    assert reader.config.method == method
    exs = KVTask(1).examples(64, seed=[7, 7])
    answers = reader.answer(reader.write([e.context for e in exs]), [e.query for e in exs], max_new_tokens=4)
    assert sum(exact_match(a, e.target) for a, e in zip(answers, exs)) / len(exs) > no_context_em + floor, answers[:8]
