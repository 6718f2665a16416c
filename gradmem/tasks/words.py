"""A word-level tokenizer for readers trained from scratch on natural-language tasks (bAbI, SQuAD).

A pretrained backbone brings its own tokenizer; a small reader trained from scratch on CPU wants a small
vocabulary with one token per word, so that a bAbI answer is one token and the model has nothing to learn about
spelling. Words are split the way GPT-2 splits them (a word keeps its leading space: ``" bathroom"``, ``"."``),
so decoding gives the text back exactly, apart from words outside the vocabulary (``<unk>``). The vocabulary is
built from the training split only. Like ``kv_tokenizer`` it is a plain ``tokenizers`` object, so
``save_pretrained`` writes a ``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` loads with no custom code.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3, as in the key-value tokenizer


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def word_counts(texts: Iterable[str]) -> Counter:
    """How often each word piece (as the tokenizer splits text) occurs in ``texts``."""
    split = _pre_tokenizer()
    counts: Counter = Counter()
    for text, repeats in Counter(texts).items():  # a SQuAD paragraph recurs once per question: split it once
        for piece, _ in split.pre_tokenize_str(text):
            counts[piece] += repeats
    return counts


def word_tokenizer(texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> PreTrainedTokenizerFast:
    """Build the tokenizer: 4 specials, then every word seen at least ``min_count`` times, most frequent first
    (ties in string order, so the same texts always give the same ids), at most ``max_size`` tokens in all."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = word_counts(texts)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if max_size is not None:
        if max_size <= len(SPECIALS):
            raise ValueError(f"max_size must leave room beyond the {len(SPECIALS)} special tokens, got {max_size}")
        words = words[: max_size - len(SPECIALS)]
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
