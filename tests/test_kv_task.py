import numpy as np
import pytest

from gradmem.tasks.kv import ALPHABET, KVTask, exact_match, kv_tokenizer


def test_tokenizer_has_70_tokens_and_round_trips(tmp_path):
    tok = kv_tokenizer()
    assert len(tok) == 70
    text = "!aZ:09!|?!aZ:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert sorted(tok.get_vocab().values()) == list(range(70))
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 2


def test_example_format_and_seeding():
    task = KVTask(pairs=16)
    ex = task.example(np.random.default_rng(0))
    assert len(ex.context) == 7 * 16 + 1 and ex.context.endswith("|")
    blocks = [ex.context[i : i + 7] for i in range(0, 7 * 16, 7)]
    assert all(b[0] == "!" and b[3] == ":" and b[6] == "!" for b in blocks)
    keys = [b[1:3] for b in blocks]
    assert len(set(keys)) == 16 and all(c in ALPHABET for k in keys for c in k)
    assert ex.query.startswith("?!") and ex.query.endswith(":") and ex.query[2:4] in keys
    value = dict((b[1:3], b[4:6]) for b in blocks)[ex.query[2:4]]
    assert ex.target == value + "!|"
    assert task.examples(5, [1, 2]) == task.examples(5, [1, 2])
    assert task.examples(5, [1, 2]) != task.examples(5, [1, 3])


def test_exact_match_ignores_punctuation():
    assert exact_match("ab!|", "ab!|")
    assert exact_match("ab", "ab!|")
    assert exact_match("ab!|zz", "ab!|")
    assert not exact_match("aB!|", "ab!|")
    assert not exact_match("a", "ab!|")


def test_collate_masks(kv_batch):
    examples, batch = kv_batch
    tok = kv_tokenizer()
    for i, ex in enumerate(examples):
        assert batch.ctx_mask[i].sum() == len(ex.context)
        assert batch.target_mask[i].sum() == len(ex.target)
        assert batch.score_mask[i].sum() == 2  # the two value characters
        target_ids = batch.read_ids[i][batch.target_mask[i].bool()].tolist()
        assert tok.decode(target_ids) == ex.target


def test_pairs_bounds():
    with pytest.raises(ValueError):
        KVTask(pairs=0)
