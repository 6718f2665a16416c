"""Associative key-value retrieval, the synthetic capacity test of the paper.

Context: N blocks ``!KK:VV!`` then ``|`` (7N + 1 characters); keys are distinct 2-character strings, values
random 2-character strings (they may repeat). Query ``?!KK:`` for one key drawn uniformly; target ``VV!|``.
Exact match counts the two value characters; ``!`` and ``|`` are ignored. Chance is 1/3844.

Multi-chunk form (``chunks=(lo, hi)``, hi > 1): a document of c chunks, c drawn uniformly from [lo, hi] per
example, each chunk a full context of N pairs (so each memory holds what a one-chunk memory holds), keys distinct
across the whole document, the query about a key of any chunk. ``chunks=(1, 1)`` draws exactly what the
one-context task draws.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gradmem.data import Batch, Example, check_chunks, collate

ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits  # 62 characters
PUNCTUATION = "!?:|"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
UNSCORED = ("!", "|")
KEY_SPACE = len(ALPHABET) ** 2  # 3844 distinct 2-character keys


def kv_tokenizer() -> PreTrainedTokenizerFast:
    """The 70-token character tokenizer (4 specials + 62 characters + ``! ? : |``) as a Hugging Face tokenizer.

    Built on the ``tokenizers`` library, so ``save_pretrained`` writes a plain ``tokenizer.json`` that
    ``AutoTokenizer.from_pretrained`` loads with no custom code.
    """
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + list(ALPHABET) + list(PUNCTUATION))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _pair_string(index: int) -> str:
    return ALPHABET[index // len(ALPHABET)] + ALPHABET[index % len(ALPHABET)]


@dataclass(frozen=True)
class KVTask:
    """Generator of key-value examples with ``pairs`` pairs per context; seeded, so any batch can be rebuilt.
    A ``gradmem.tasks.base.Task``."""

    pairs: int = 8  # per chunk
    answer_stop: tuple[str, ...] = ("|",)
    chunks: tuple[int, int] = (1, 1)  # c drawn uniformly from [lo, hi] per example

    def __post_init__(self) -> None:
        lo, hi = check_chunks(self.chunks)
        if not 1 <= self.pairs * hi <= KEY_SPACE:
            raise ValueError(f"pairs x chunks must be in [1, {KEY_SPACE}] (distinct keys), got {self.pairs} x {hi}")

    @property
    def name(self) -> str:
        lo, hi = self.chunks
        return f"kv N={self.pairs}" + ("" if hi == 1 else f" c={lo}" if lo == hi else f" c={lo}..{hi}")

    @property
    def context_chars(self) -> int:
        return 7 * self.pairs + 1

    def example(self, rng: np.random.Generator) -> Example:
        lo, hi = self.chunks
        c = lo if lo == hi else int(rng.integers(lo, hi + 1))  # no draw for a fixed c: c = 1 is the plain task
        keys = rng.choice(KEY_SPACE, size=c * self.pairs, replace=False)
        values = rng.integers(0, KEY_SPACE, size=c * self.pairs)
        blocks = [f"!{_pair_string(k)}:{_pair_string(v)}!" for k, v in zip(keys, values)]
        texts = tuple("".join(blocks[j * self.pairs : (j + 1) * self.pairs]) + "|" for j in range(c))
        i = int(rng.integers(0, c * self.pairs))
        return Example(context=texts[0] if c == 1 else texts, query=f"?!{_pair_string(keys[i])}:",
                       target=f"{_pair_string(values[i])}!|")

    def examples(self, n: int, seed: int | Sequence[int]) -> list[Example]:
        """``n`` examples from ``np.random.default_rng(seed)``; pass e.g. ``[seed, rank, step]`` for disjoint streams."""
        rng = np.random.default_rng(seed)
        return [self.example(rng) for _ in range(n)]

    def batch(self, n: int, seed: int | Sequence[int], tokenizer: PreTrainedTokenizerFast) -> Batch:
        return collate(self.examples(n, seed), tokenizer, unscored=UNSCORED)

    def eval_size(self, samples: int, start: int = 0) -> int:
        return samples  # generated: as many as asked

    def eval_batch(self, start: int, n: int, seed: Sequence[int], tokenizer: PreTrainedTokenizerFast) -> Batch:
        return self.batch(n, seed, tokenizer)  # drawn from the evaluation's own seed; no order to walk


def exact_match(prediction: str, target: str) -> bool:
    """Both value characters right; ``!`` and ``|`` (and anything after the first ``|``) are ignored."""
    def core(s: str) -> str:
        return s.split("|", 1)[0].replace("!", "").strip()

    return core(prediction) == core(target)

