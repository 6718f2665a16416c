"""bAbI: the loader against the released files, the split, the metric, and a tiny reader training on it."""

import math
from pathlib import Path

import pytest
import torch

from gradmem.data import Example
from gradmem.tasks import babi
from gradmem.tasks.words import word_tokenizer
from gradmem.train import TrainConfig, Trainer, build_task
from conftest import DATA, needs_data

pytestmark = needs_data
ROOT = babi.default_root() if DATA else None

# (set, task) -> released questions in the train file; every test file holds 1,000 (the data directory's README.md)
RELEASED = {**{("en", f"qa{i}"): 1000 for i in range(1, 6)}, **{("en-10k", f"qa{i}"): 10000 for i in (1, 2, 4, 5)}}
STORIES = {"qa1": 200, "qa2": 200, "qa3": 200, "qa4": 1000, "qa5": 200}  # en train files


def tab_lines(path: Path) -> int:
    """Question lines, counted the plain way: lines holding a tab."""
    return sum("\t" in line for line in path.read_text().splitlines())


@pytest.mark.parametrize("babi_set,task", sorted(RELEASED))
def test_counts_match_the_released_files(babi_set, task):
    train_file = babi.task_file(ROOT, babi_set, task, "train")
    test_file = babi.task_file(ROOT, babi_set, task, "test")
    assert tab_lines(train_file) == RELEASED[babi_set, task] and tab_lines(test_file) == 1000
    sizes = {split: len(babi.load_questions([task], split, babi_set)) for split in babi.SPLITS}
    assert sizes["train"] + sizes["validation"] == RELEASED[babi_set, task]
    assert sizes["validation"] == RELEASED[babi_set, task] // 10  # 10% of the stories is 10% of the questions
    assert sizes["test"] == 1000
    if babi_set == "en":
        assert max(q.story for q in babi.parse(train_file.read_text())) + 1 == STORIES[task]


def test_stories_become_contexts_as_the_paper_builds_them():
    questions = babi.parse(babi.task_file(ROOT, "en", "qa1", "train").read_text(), "qa1")
    first, second, fifth, sixth = questions[0], questions[1], questions[4], questions[5]
    assert first.example() == Example(
        "Mary moved to the bathroom. John went to the hallway.", "Where is Mary?", " bathroom")
    assert first.supporting == (1,)
    # earlier questions are not part of the context; all earlier statements are, supporting or not
    assert second.facts == ("Mary moved to the bathroom.", "John went to the hallway.",
                            "Daniel went back to the hallway.", "Sandra moved to the garden.")
    assert second.answer == "hallway" and second.supporting == (4,)
    assert len(fifth.facts) == 10 and fifth.question == "Where is Sandra?" and fifth.answer == "bathroom"
    # a new story starts from scratch
    assert sixth.story == 1 and sixth.facts == ("Sandra travelled to the office.", "Sandra went to the bathroom.")


def test_parse_rejects_malformed_lines():
    with pytest.raises(ValueError, match="was expected"):
        babi.parse("1 Mary moved to the bathroom.\n3 John went to the hallway.\n")
    with pytest.raises(ValueError, match="separated by tabs"):
        babi.parse("1 Mary moved to the bathroom.\n2 Where is Mary?\tbathroom\n")
    with pytest.raises(ValueError, match="expected 'ID text'"):
        babi.parse("Mary moved to the bathroom.\n")


def test_split_is_by_story_deterministic_and_seeded():
    def stories(split, seed=0):
        return {q.story for q in babi.load_questions(["qa2"], split, "en", split_seed=seed)}

    train, validation = stories("train"), stories("validation")
    assert not train & validation and len(train | validation) == 200 and len(validation) == 20
    assert stories("validation") == validation
    assert stories("validation", seed=1) != validation
    pooled = babi.load_questions(["qa1", "qa4"], "validation", "en")
    assert [q.task for q in pooled].count("qa1") == 100 and [q.task for q in pooled].count("qa4") == 100


def test_missing_file_and_unknown_names_fail_clearly():
    with pytest.raises(FileNotFoundError, match="use set en"):
        babi.load_questions(["qa3"], "train", "en-10k")
    with pytest.raises(ValueError, match="unknown bAbI task"):
        babi.load_questions(["qa21"], "train", "en")
    with pytest.raises(ValueError, match="unknown bAbI set"):
        babi.load_questions(["qa1"], "train", "en-1k")
    with pytest.raises(ValueError, match="qa1 .. qa20"):
        TrainConfig.from_dict({"task": {"name": "babi", "tasks": ["qa0"]}})


def test_exact_match_of_the_answer_word():
    assert babi.exact_match(" bathroom", "bathroom")
    assert babi.exact_match("Bathroom\n", "bathroom")
    assert babi.exact_match("  apple,football ", "apple,football")
    assert not babi.exact_match("bathroom.", "bathroom")  # only case and whitespace are normalised
    assert not babi.exact_match("the bathroom", "bathroom")
    assert not babi.exact_match("", "bathroom")
    assert babi.metric("Hallway", ["hallway"]) == {"em": 1.0}


def test_word_tokenizer_from_the_training_split(tmp_path):
    task = babi.babi_task(["qa1"], "train", "en")
    tok = word_tokenizer(task.texts())
    example = task.items[0]
    for text in (example.context, example.query, example.target):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids
    assert len(tok(" bathroom", add_special_tokens=False)["input_ids"]) == 1  # one token per answer word
    assert word_tokenizer(task.texts()).get_vocab() == tok.get_vocab()  # same texts, same ids
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(example.context, add_special_tokens=False)["input_ids"] == tok(example.context, add_special_tokens=False)["input_ids"]
    assert (tmp_path / "tokenizer.json").is_file() and loaded.eos_token_id == 2


def test_batches_are_seeded_and_end_answers_with_an_unscored_eos():
    task = babi.babi_task(["qa1"], "train", "en")
    tok = word_tokenizer(task.texts())
    assert task.examples(8, [0, 0, 3]) == task.examples(8, [0, 0, 3]) != task.examples(8, [0, 0, 4])
    batch = task.batch(8, [0, 0, 3], tok)
    for i in range(len(batch)):
        target = batch.read_ids[i][batch.target_mask[i].bool()].tolist()
        scored = batch.read_ids[i][batch.score_mask[i].bool()].tolist()
        assert target[-1] == tok.eos_token_id and scored == target[:-1] and len(scored) == 1


def tiny_config(task: dict, max_steps: int = 3) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                  "max_positions": 512},
        "memory": {"num_memory": 4, "write_steps": 2, "write_lr": 0.5},
        "task": task,
        "optim": {"batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "max_steps": max_steps},
        "run": {"log_every": 1, "eval_every": 0, "eval_samples": 8, "eval_batch_size": 4, "save_every": 0},
    })


def test_tiny_reader_trains_a_few_steps_on_babi(tmp_path):
    cfg = tiny_config({"name": "babi", "babi_set": "en", "tasks": ["qa1", "qa2"]})
    trainer = Trainer(cfg, tmp_path)
    assert len(trainer.task) == 1800 and len(trainer.eval_task) == 200
    trainer.fit()
    import json

    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["read_loss"]) for r in records)
    result = trainer.evaluate([2])[2]
    assert result["em"] <= 1.0 and math.isfinite(result["write_loss"])
    assert records[-1]["step"] == trainer.step == 3
    from gradmem.tasks import evaluate_generated

    scores, answers = evaluate_generated(trainer.reader, trainer.eval_task, 4, max_new_tokens=2)
    golds = trainer.eval_task.golds[:4]  # the score is the task metric over these very answers
    assert len(answers) == 4 and scores["em"] == sum(babi.exact_match(a, g[0]) for a, g in zip(answers, golds)) / 4
    from gradmem import Reader

    exported = Reader.from_pretrained(tmp_path / "reader")  # the word tokenizer travels with the reader
    assert exported.tokenizer.get_vocab() == trainer.reader.tokenizer.get_vocab()
    assert torch.equal(exported.memory, trainer.reader.memory)
    test = build_task(cfg.task, "test")
    assert len(test) == 2000


def test_shortcut_baselines_on_qa1():
    """The shortcut the CPU comparison's readers learned (the last statement's location) scores about half of qa1;
    answering from the last statement naming the person solves it (a check of the parsing, and of the shortcut)."""
    from benchmarks.babi_heuristics import shortcuts

    result = shortcuts(["qa1"], ["validation", "test"], "en-10k", None)
    for split in result.values():
        assert split["questions"] == 1000 and split["last_mention"] == 1.0
        assert 0.45 < split["last_sentence"] < 0.6 and split["most_frequent"] < 0.25


def test_stories_split_into_chunks_of_statements_in_order(tmp_path):
    """Multi-chunk bAbI: each story before a question in c runs of statements (c capped by the statements), the
    same stories as the one-chunk stream; a tiny reader trains, evaluates and answers over composed memories."""
    plain = babi.babi_task(["qa1"], "validation", "en")
    chunked = babi.babi_task(["qa1"], "validation", "en", chunks=(1, 4))
    ordered = chunked.ordered(0, 8)
    for e, base, k in zip(ordered, plain.ordered(0, 8), range(8)):
        assert " ".join(e.chunks) == base.context and (e.query, e.target) == (base.query, base.target)
        assert len(e.chunks) == min(1 + k % 4, len(chunked.units[k]))  # c cycles 1..4 in evaluation
        assert all(text.endswith(".") for text in e.chunks)  # whole statements only
    cfg = tiny_config({"name": "babi", "babi_set": "en", "tasks": ["qa1"], "chunks": [1, 3]}, max_steps=2)
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    assert math.isfinite(trainer.evaluate([2])[2]["token_acc"])
    from gradmem.tasks import evaluate_generated

    scores, answers = evaluate_generated(trainer.reader, trainer.eval_task, 6, max_new_tokens=2)
    assert len(answers) == 6 and 0.0 <= scores["em"] <= 1.0
