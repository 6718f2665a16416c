"""SQuAD v1.1: the loader against the released dev file, the split by article, the variants, the official
metrics on hand-worked cases, and a tiny reader training on each variant."""

import json
import math

import pytest

from gradmem.data import Example
from gradmem.tasks import squad
from gradmem.train import TrainConfig, Trainer
from conftest import DATA, needs_data

pytestmark = needs_data
PATH = squad.default_path() if DATA else None


@pytest.fixture(scope="module")
def questions():
    return squad.parse(json.loads(PATH.read_text()))


def test_counts_match_the_released_file(questions):
    raw = json.loads(PATH.read_text())
    assert raw["version"] == "1.1" and len(raw["data"]) == 48
    assert sum(len(a["paragraphs"]) for a in raw["data"]) == 2067
    assert len(questions) == 10570 and len({q.id for q in questions}) == 10570
    assert sum(len(q.answers) for q in questions) == 34726
    assert len({(q.article, q.context) for q in questions}) == 2067


def test_split_by_article(questions):
    articles = {split: {q.article for q in squad.load_questions(split)} for split in squad.SPLITS}
    assert {k: len(v) for k, v in articles.items()} == {"train": 38, "validation": 5, "test": 5}
    assert not (articles["train"] & articles["validation"] or articles["train"] & articles["test"]
                or articles["validation"] & articles["test"])
    sizes = {split: len(squad.load_questions(split)) for split in squad.SPLITS}
    assert sizes == {"train": 8814, "validation": 761, "test": 995} and sum(sizes.values()) == len(questions)
    assert squad.article_splits(48, 0.1, 0.1, 0) == squad.article_splits(48, 0.1, 0.1, 0)
    assert squad.article_splits(48, 0.1, 0.1, 1) != squad.article_splits(48, 0.1, 0.1, 0)
    with pytest.raises(ValueError, match="leave some training data"):
        squad.article_splits(48, 0.5, 0.5, 0)


def test_variants(questions):
    q = questions[0]
    assert q.question == "Which NFL team represented the AFC at Super Bowl 50?"
    assert q.answers == ("Denver Broncos", "Denver Broncos", "Denver Broncos")
    context = q.context.strip()
    assert q.example("c_qa") == Example(context, q.question, " Denver Broncos")
    assert q.example("cq_a") == Example(f"{context} {q.question}", "Answer:", " Denver Broncos")
    assert q.example("qc_a") == Example(f"{q.question} {context}", "Answer:", " Denver Broncos")
    with pytest.raises(ValueError, match="unknown SQuAD variant"):
        q.example("a_cq")
    task = squad.squad_task("cq_a", "validation")
    assert len(task) == 761 and all(e.query == "Answer:" for e in task.items)
    assert all(len(g) >= 1 for g in task.golds)


def test_official_normalisation():
    assert squad.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert squad.normalize_answer("an apple a day") == "apple day"
    assert squad.normalize_answer("Theatre, anthem") == "theatre anthem"  # articles only as whole words
    assert squad.normalize_answer("U.S.") == "us"
    assert squad.normalize_answer("  \t(1990)\n") == "1990"


def test_exact_match_and_f1_hand_worked():
    assert squad.exact_match_score("the Denver Broncos.", "Denver Broncos") == 1.0
    assert squad.exact_match_score("Denver", "Denver Broncos") == 0.0
    # partial overlap: 2 shared tokens, precision 2/3, recall 1 -> F1 0.8
    assert squad.f1_score("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # precision 1, recall 1/2 -> 2/3
    assert squad.f1_score("Broncos", "the Denver Broncos") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred [a1 a1] vs gold [a1]: shared 1, P 1/2, R 1 -> 2/3
    assert squad.f1_score("seven seven", "seven") == pytest.approx(2 / 3)
    assert squad.f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    # an answer of articles only normalises to nothing: equal strings, but no shared token (the official rule)
    assert squad.exact_match_score("the", "a") == 1.0 and squad.f1_score("the", "a") == 0.0


def test_metric_takes_the_best_gold():
    golds = ["Denver Broncos", "the Broncos", "Broncos of Denver"]
    assert squad.metric("Broncos", golds) == {"em": 1.0, "f1": 1.0}
    scores = squad.metric("Denver", golds)
    assert scores["em"] == 0.0 and scores["f1"] == pytest.approx(2 / 3)  # best: "Denver Broncos", P 1, R 1/2
    task = squad.squad_task("c_qa", "test")
    golds0 = task.golds[0]
    assert task.score([golds0[0], "zzz"], 0)["em"] == pytest.approx(0.5 + 0.5 * squad.metric("zzz", task.golds[1])["em"])


@pytest.mark.parametrize("variant", squad.VARIANTS)
def test_tiny_reader_trains_a_few_steps_on_each_variant(variant, tmp_path):
    cfg = TrainConfig.from_dict({
        "model": {"arch": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                  "max_positions": 1024},
        "memory": {"num_memory": 4, "write_steps": 1, "write_lr": 0.5},
        "task": {"name": "squad", "variant": variant, "vocab_min_count": 2},
        "optim": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "max_steps": 3},
        "run": {"log_every": 1, "eval_every": 3, "eval_samples": 4, "eval_batch_size": 4, "save_every": 0},
    })
    trainer = Trainer(cfg, tmp_path)
    assert len(trainer.task) == 8814 and len(trainer.eval_task) == 761
    trainer.fit()
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)
    evals = [r for r in records if r["event"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 3
    again = trainer.evaluate()[1]  # the logged evaluation is the reader's, on the same validation questions
    assert (evals[0]["em"], evals[0]["token_acc"]) == pytest.approx((again["em"], again["token_acc"]))


def test_c_qa_paragraphs_split_into_chunks_of_sentences():
    assert squad.sentences(" It rained. Did it?  Yes! U.S. law.") == ["It rained.", "Did it?", "Yes!", "U.S.", "law."]
    plain = squad.squad_task("c_qa", "validation")
    chunked = squad.squad_task("c_qa", "validation", chunks=(2, 2))
    for e, base in zip(chunked.ordered(0, 20), plain.ordered(0, 20)):
        assert (e.query, e.target) == (base.query, base.target)
        assert " ".join(e.chunks).split() == base.context.split()  # every word, in order
        assert len(e.chunks) == min(2, len(squad.sentences(base.context)))
    with pytest.raises(ValueError, match="cannot split its contexts"):
        squad.squad_task("cq_a", "validation", chunks=(1, 2))
