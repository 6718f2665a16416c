"""Composed READ over a document's chunk memories, ``[M_1; ...; M_c; Q]``, and the multi-chunk tasks.

What is checked, for every method behind the one interface: c = 1 is today's single-memory READ exactly
(teacher-forced and greedy); a composed READ is the backbone on the concatenated prefix rows at consecutive
positions (full_context: exactly the plain LM on the whole document ``[C_1; ...; C_c; Q]``); a document's losses and
answers do not depend on the other documents in its batch, whatever their chunk counts (padding); the multi-chunk
key-value and natural-language tasks draw what they claim and train through ``meta_step`` / ``Trainer``.
"""

from __future__ import annotations

import pytest
import torch

from gradmem import methods
from gradmem.config import ConfigError
from gradmem.data import Example, collate, split_units
from gradmem.read import compose, read_teacher_forced
from gradmem.tasks.dataset import ExampleSet
from gradmem.tasks.kv import UNSCORED, KVTask
from gradmem.train import OptimConfig, TrainConfig, Trainer, evaluate, meta_step
from conftest import make_reader

ALL_METHODS = ("gradmem", "rmt", "full_context", "no_context")

# Three documents of 1, 3 and 2 chunks (different lengths, so both chunk counts and chunk lengths pad).
DOCS = [
    Example(context="!ab:cd!|", query="?!ab:", target="cd!|"),
    Example(context=("!ef:gh!!ij:kl!|", "!mn:op!|", "!qr:st!!uv:wx!!yz:AB!|"), query="?!mn:", target="op!|"),
    Example(context=("!CD:EF!!GH:IJ!|", "!KL:MN!|"), query="?!KL:", target="MN!|"),
]


def _reader(arch: str, method: str):
    return make_reader(arch, method=method, mem_proj=method in ("gradmem", "rmt")).eval()


def _read(reader, docs, chunks=True):
    """Write every chunk of ``docs`` in one call and READ each document teacher-forced (without ``chunks``: one
    memory per document, as before composition)."""
    batch = collate(docs, reader.tokenizer, unscored=UNSCORED)
    out = methods.write(reader, batch.ctx_ids, batch.ctx_mask, 2, 0.5, mode="inference")
    return read_teacher_forced(reader, out.memory, batch.read_ids, batch.target_mask, batch.score_mask, out.lengths,
                               batch.chunks if chunks else None)


# ------------------------------------------------------------------------------------------ compose
def test_compose_concatenates_real_rows_in_order_and_passes_c1_through():
    prefix = torch.arange(5 * 3 * 2, dtype=torch.float32).reshape(5, 3, 2)  # (N, P, d)
    rows = torch.tensor([3, 1, 2, 0, 3])
    composed, totals = compose(prefix, rows, torch.tensor([2, 1, 2]))
    assert totals.tolist() == [4, 2, 3] and composed.shape == (3, 4, 2)
    assert torch.equal(composed[0], torch.cat([prefix[0, :3], prefix[1, :1]]))
    assert torch.equal(composed[1, :2], prefix[2, :2]) and not composed[1, 2:].any()  # right-padded
    assert torch.equal(composed[2, :3], prefix[4, :3])  # an empty memory adds nothing
    same, same_rows = compose(prefix, rows, torch.ones(5, dtype=torch.long))
    assert same is prefix and same_rows is rows  # c = 1: the single-memory READ's very tensors
    assert compose(prefix, rows, None)[0] is prefix
    empty, none = compose(prefix[:, :0], torch.zeros(5, dtype=torch.long), torch.tensor([3, 2]))
    assert empty.shape == (2, 0, 2) and none.tolist() == [0, 0]  # no_context: nothing, composed
    with pytest.raises(ValueError, match="add up to 4, not to the 5"):
        compose(prefix, rows, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="at least one memory"):
        compose(prefix, rows, torch.tensor([5, 0]))


# ------------------------------------------------------------------------------------------ c = 1
@pytest.mark.parametrize("method", ALL_METHODS)
def test_composed_read_with_one_chunk_is_the_single_memory_read(arch, method):
    reader = _reader(arch, method)
    singles = [Example(d.chunks[0], d.query, d.target) for d in DOCS]
    with torch.no_grad():
        composed, single = _read(reader, singles), _read(reader, singles, chunks=False)
    for field in ("loss", "token_accuracy", "exact_match"):
        assert torch.equal(getattr(composed, field), getattr(single, field)), field
    mem = reader.write([e.context for e in singles])
    questions = [e.query for e in singles]
    assert reader.answer(mem, questions, max_new_tokens=4, chunks=[1, 1, 1]) == reader.answer(mem, questions, max_new_tokens=4)


# ------------------------------------------------------------------------------------------ c > 1
def test_full_context_composed_read_is_the_plain_lm_on_the_whole_document(arch):
    """The upper bound of a chunked document is the backbone on [C_1; ...; C_c; Q]: consecutive positions."""
    reader = _reader(arch, "full_context")
    tok = reader.tokenizer
    with torch.no_grad():
        read = _read(reader, DOCS)
        for i, doc in enumerate(DOCS):
            prompt = tok.convert_tokens_to_ids(list("".join(doc.chunks) + doc.query))
            target = tok.convert_tokens_to_ids(list(doc.target))
            logits = reader.lm(input_ids=torch.tensor([prompt + target])).logits[0]  # (T, V)
            expected = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(target))
            assert torch.allclose(read.loss[i], expected, atol=1e-5), (i, read.loss[i], expected)
            generated = reader.lm.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                                           pad_token_id=tok.pad_token_id)[0, len(prompt) :]
            mem = reader.write(list(doc.chunks))
            answer = reader.answer(mem, [doc.query], max_new_tokens=4, chunks=[len(doc.chunks)])[0]
            assert answer == reader._decode_answer(generated.tolist())


def test_gradmem_composed_read_is_the_backbone_on_the_projected_memories_in_order(arch):
    reader = _reader(arch, "gradmem")
    doc = DOCS[1]
    with torch.no_grad():
        read = _read(reader, [doc])
        mem = reader.write(list(doc.chunks))
        prefix = reader.project(mem.tensor).reshape(1, -1, reader.d_model)  # (1, c*m, d): M_1, M_2, M_3 in order
        q = reader.tokenizer.convert_tokens_to_ids(list(doc.query + doc.target))
        hidden = reader.hidden(prefix, torch.tensor([q[:-1]]))[:, prefix.shape[1] + 4 :]  # rows predicting the target
        target = torch.tensor(q[5:])
        expected = torch.nn.functional.cross_entropy(reader.lm.get_output_embeddings()(hidden[0]), target)
        assert torch.allclose(read.loss[0], expected, atol=1e-5)
        shuffled = reader.project(mem.tensor[[2, 0, 1]]).reshape(1, -1, reader.d_model)
        other = reader.hidden(shuffled, torch.tensor([q[:-1]]))[:, prefix.shape[1] + 4 :]
        assert not torch.allclose(other, hidden, atol=1e-4)  # the order of the memories is seen


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_documents_read_does_not_depend_on_its_batch(arch, method):
    """Teacher-forced and greedy: documents of 1, 3 and 2 chunks batched together (padded chunk counts and
    lengths) read as each alone; greedy answers also in batches that split the memories (batch_size=2)."""
    reader = _reader(arch, method)
    with torch.no_grad():
        together = _read(reader, DOCS)
        for i, doc in enumerate(DOCS):
            alone = _read(reader, [doc])
            assert torch.allclose(together.loss[i], alone.loss[0], atol=1e-5), (method, i)
            assert together.exact_match[i] == alone.exact_match[0]
    mem = reader.write([text for d in DOCS for text in d.chunks])
    counts = [len(d.chunks) for d in DOCS]
    questions = [d.query for d in DOCS]
    batched = reader.answer(mem, questions, max_new_tokens=4, chunks=counts)
    assert reader.answer(mem, questions, max_new_tokens=4, chunks=counts, batch_size=2) == batched
    first = 0
    for i, doc in enumerate(DOCS):
        n = len(doc.chunks)
        assert reader.answer(mem[list(range(first, first + n))], [doc.query], max_new_tokens=4, chunks=[n]) == [batched[i]]
        first += n


def test_answer_checks_chunk_counts_and_the_composed_length():
    reader = _reader("llama", "gradmem")
    mem = reader.write(["!ab:cd!|"] * 5)
    with pytest.raises(ValueError, match="one chunk count per question"):
        reader.answer(mem, ["?!ab:", "?!ab:"], chunks=[5])
    with pytest.raises(ValueError, match="add up to 4 memories, but 5"):
        reader.answer(mem, ["?!ab:", "?!ab:"], chunks=[2, 2])
    many = reader.write(["!ab:cd!|"] * 30)  # 30 memories of 4 rows: 120 + query > the backbone's 128 positions
    with pytest.raises(ValueError, match="question 0 is too long: 5 tokens \\+ 120 memory"):
        reader.answer(many, ["?!ab:"], max_new_tokens=4, chunks=[30])


def test_a_teacher_forced_read_past_the_backbone_positions_is_refused():
    reader = _reader("llama", "full_context")
    doc = Example(context=tuple(["!ab:cd!" * 7 + "|"] * 3), query="?!ab:", target="cd!|")  # 3 x 50 rows > 128
    with pytest.raises(ValueError, match="150 memory rows \\+ 9 tokens exceeds the backbone's 128 positions"):
        _read(reader, [doc])


# ------------------------------------------------------------------------------------------ tasks
def test_kv_chunks_draw_documents_of_distinct_keys_and_c1_is_the_plain_task():
    assert KVTask(3, chunks=(1, 1)).examples(4, seed=5) == KVTask(3).examples(4, seed=5)
    examples = KVTask(2, chunks=(1, 4)).examples(200, seed=1)
    counts = [len(e.chunks) for e in examples]
    assert set(counts) == {1, 2, 3, 4}
    for e in examples:
        blocks = [text[k : k + 7] for text in e.chunks for k in range(0, 14, 7)]
        assert all(len(text) == 15 and text.endswith("|") for text in e.chunks)
        keys = [b[1:3] for b in blocks]
        assert len(set(keys)) == len(keys)  # the query names one pair of the whole document
        assert f"!{e.query[2:4]}:{e.target[:2]}!" in blocks
    batch = KVTask(2, chunks=(2, 3)).batch(5, seed=0, tokenizer=make_reader("llama").tokenizer)
    assert len(batch) == 5 and batch.ctx_ids.shape[0] == int(batch.chunks.sum()) and set(batch.chunks.tolist()) <= {2, 3}
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        KVTask(2, chunks=(3, 2))


def test_example_sets_split_units_in_order_and_cycle_c_in_evaluation():
    assert split_units(["a.", "b.", "c.", "d.", "e."], 2) == ("a. b. c.", "d. e.")
    assert split_units(["a.", "b."], 5) == ("a.", "b.") and split_units(["a.", "b."], 1) == "a. b."
    units = [[f"s{k}_{j}." for j in range(4)] for k in range(6)]
    items = [Example(" ".join(u), "q?", " a") for u in units]
    plain = ExampleSet("toy", items, [("a",)] * 6, lambda p, g: {"em": 1.0})
    chunked = ExampleSet("toy", items, [("a",)] * 6, lambda p, g: {"em": 1.0}, units=units, chunks=(1, 3))
    assert [len(e.chunks) for e in chunked.ordered(0, 6)] == [1, 2, 3, 1, 2, 3]
    assert chunked.ordered(1, 1)[0].chunks == ("s1_0. s1_1.", "s1_2. s1_3.")
    drawn = chunked.examples(50, seed=3)
    assert [" ".join(e.chunks) for e in drawn] == [e.context for e in plain.examples(50, seed=3)]  # same stories
    assert {len(e.chunks) for e in drawn} == {1, 2, 3}
    with pytest.raises(ValueError, match="cannot split its contexts"):
        ExampleSet("toy", items, [("a",)] * 6, lambda p, g: {"em": 1.0}, chunks=(1, 2))


@pytest.mark.parametrize("chunks, message", [
    ([0, 2], "1 <= lo <= hi"), ([3, 2], "1 <= lo <= hi"), ([1, 2, 3], "1 <= lo <= hi"),
])
def test_config_validates_the_chunk_range(chunks, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"task": {"chunks": chunks}})


def test_config_refuses_chunks_where_the_task_has_none():
    with pytest.raises(ConfigError, match="not for squad cq_a"):
        TrainConfig.from_dict({"task": {"name": "squad", "variant": "cq_a", "chunks": [1, 2]}})
    with pytest.raises(ConfigError, match="not for file"):
        TrainConfig.from_dict({"task": {"name": "file", "path": "x.jsonl", "chunks": [2, 2]}})
    assert TrainConfig.from_dict({"task": {"chunks": [1, 4]}}).task.chunks == [1, 4]


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method", ALL_METHODS)
def test_meta_step_on_multi_chunk_documents_reaches_the_learned_memory(method):
    reader = make_reader("llama", method=method).train()
    batch = KVTask(1, chunks=(1, 3)).batch(6, seed=2, tokenizer=reader.tokenizer)
    loss, metrics = meta_step(reader, batch, OptimConfig(attention="sdpa_math", aux_write_loss=0.5), 2, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= metrics["em"] <= 1.0
    if method in ("gradmem", "rmt"):
        assert reader.memory.grad is not None and reader.memory.grad.abs().sum() > 0
    result = evaluate(reader, KVTask(1, chunks=(2, 2)), samples=6, steps_list=[2], lr=0.5, batch_size=4)[2]
    assert 0.0 <= result["em"] <= 1.0


def test_trainer_trains_and_evaluates_with_chunks_drawn_from_a_range(tmp_path):
    cfg = TrainConfig.from_dict({
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_positions": 128},
        "memory": {"num_memory": 4, "write_steps": 1, "write_lr": 0.5},
        "task": {"pairs": 1, "chunks": [1, 3]},
        "optim": {"batch_size": 4, "warmup_steps": 1, "max_steps": 2},
        "run": {"eval_every": 2, "eval_samples": 6, "save_every": 0, "log_every": 1, "stop_at_em": None},
    })
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    assert trainer.step == 2 and trainer.task.chunks == (1, 3) and trainer.best_record() is not None


def test_evaluate_job_scores_documents_of_c_chunks(tmp_path):
    """``jobs/evaluate.py --chunks`` is the library's evaluate on the multi-chunk task (issue 15's EM by c)."""
    from conftest import load_job

    reader = make_reader("llama").freeze()
    reader.save_pretrained(tmp_path / "reader")
    out = load_job("evaluate").main(["--reader", str(tmp_path / "reader"), "--pairs", "1", "--chunks", "3",
                                     "--steps", "2", "--samples", "8", "--json", str(tmp_path / "eval.json")])
    assert out["chunks"] == [3, 3] and out["task"] == "kv N=1 c=3"
    expected = evaluate(reader, KVTask(1, chunks=(3, 3)), 8, [2], reader.config.write_lr, seed=("evaluate", 0))
    assert out["results"]["2"]["token_acc"] == pytest.approx(expected[2]["token_acc"])
