"""SQuAD v1.1 from memory, on the official development set only.

The official training file is not available here, so ``dev-v1.1.json`` (48 articles, 2,067 paragraphs, 10,570
questions) is split BY ARTICLE into train / validation / test: a permutation of the articles seeded with
``split_seed`` gives the first ``round(validation_fraction * 48)`` articles (default 0.1: 5) to validation, the
next ``round(test_fraction * 48)`` (default 0.1: 5) to test and the other 38 to train. No paragraph or topic
is shared between splits. Results on this split are not comparable with numbers on the official dev set.
The file: ``task.path``, else ``$GRADMEM_DATA/squad/dev-v1.1.json``.

Variants (formatting as in the paper's reference code; the context and question are stripped):

- ``c_qa``  ("C -> Q+A"): WRITE the paragraph; READ the question then the answer.
  query ``"<question>"``, target ``" <answer>"``.
- ``cq_a``  ("CQ -> A"): WRITE paragraph + " " + question; READ ``"Answer:"`` then the answer.
- ``qc_a``  ("QC -> A"): WRITE question + " " + paragraph; READ ``"Answer:"`` then the answer.

Multi-chunk form (``chunks=(lo, hi)``, ``c_qa`` only: the other variants put the question into the context): the
paragraph is split into c chunks of consecutive sentences (``sentences``; ``gradmem.tasks.dataset``), each written
into its own memory; the question is about the one paragraph, whose answer sits in one of the chunks.

The READ loss and teacher-forced exact match cover the answer tokens only. Training targets use the first gold
answer (as the reference code does); generated answers are scored against every gold answer with the official
v1.1 metrics: exact match and token F1 after normalisation (lower case, punctuation and the articles a/an/the
removed, whitespace collapsed), the maximum over the golds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from gradmem.data import Example
from gradmem.tasks.dataset import ExampleSet, data_root, read_text

logger = logging.getLogger(__name__)

VARIANTS = ("c_qa", "cq_a", "qc_a")
SPLITS = ("train", "validation", "test")
ANSWER_PROMPT = "Answer:"
PUNCTUATION = frozenset(string.punctuation)  # ASCII punctuation, as the official script removes


def default_path() -> Path:
    """The released dev file under ``$GRADMEM_DATA`` (FileNotFoundError naming task.path and GRADMEM_DATA when it
    is unset)."""
    return data_root("SQuAD's dev-v1.1.json") / "squad" / "dev-v1.1.json"


@dataclass(frozen=True)
class SquadQuestion:
    id: str
    article: int  # index of the article in the file
    title: str
    context: str
    question: str
    answers: tuple[str, ...]  # gold answers as given (duplicates kept, as in the file)

    def example(self, variant: str = "c_qa") -> Example:
        context, question, answer = self.context.strip(), self.question.strip(), self.answers[0].strip()
        if variant == "c_qa":
            return Example(context=context, query=question, target=" " + answer)
        if variant == "cq_a":
            return Example(context=f"{context} {question}", query=ANSWER_PROMPT, target=" " + answer)
        if variant == "qc_a":
            return Example(context=f"{question} {context}", query=ANSWER_PROMPT, target=" " + answer)
        raise ValueError(f"unknown SQuAD variant {variant!r}; choose one of {VARIANTS}")


def sentences(text: str) -> list[str]:
    """``text`` split after each ``.``, ``!`` or ``?`` that whitespace follows (a plain rule: abbreviations split
    too, which only makes more, shorter units)."""
    return [piece for piece in re.split(r"(?<=[.!?])\s+", text.strip()) if piece]


def parse(data: object) -> list[SquadQuestion]:
    """Every question of a SQuAD v1.1 JSON document, in file order. A document of another shape is one
    ValueError naming where (``data[3].paragraphs[0].qas[2].answers``) and what was expected there."""
    version = data.get("version", "") if isinstance(data, dict) else None
    if not str(version).startswith("1."):
        got = f"version {version!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ValueError(f"expected a SQuAD v1.x JSON object, got {got}")
    out: list[SquadQuestion] = []
    for a, article in enumerate(_field(data, "data", list, "document")):
        where = f"data[{a}]"
        title = _field(article, "title", str, where)
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where)):
            here = f"{where}.paragraphs[{p}]"
            context = _field(paragraph, "context", str, here)
            for q, qa in enumerate(_field(paragraph, "qas", list, here)):
                at = f"{here}.qas[{q}]"
                answers = tuple(_field(ans, "text", str, f"{at}.answers[{i}]")
                                for i, ans in enumerate(_field(qa, "answers", list, at)))
                if not answers:
                    raise ValueError(f"{at}: a question without an answer (SQuAD v1.1 always has one)")
                out.append(SquadQuestion(_field(qa, "id", str, at), a, title, context, _field(qa, "question", str, at),
                                         answers))
    if not out:
        raise ValueError("no questions")
    return out


def _field(item: object, key: str, kind: type, where: str):
    """``item[key]`` when ``item`` is an object holding a ``kind`` there, else a ValueError naming ``where``."""
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, kind):
        raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def article_splits(n_articles: int, validation_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Article indices of each split, by a seeded permutation (validation first, then test, the rest train)."""
    if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 1:
        raise ValueError(f"fractions must be >= 0 and leave some training data: validation {validation_fraction}, "
                         f"test {test_fraction}")
    order = np.random.default_rng(seed).permutation(n_articles).tolist()
    n_val, n_test = round(validation_fraction * n_articles), round(test_fraction * n_articles)
    return {"validation": sorted(order[:n_val]), "test": sorted(order[n_val : n_val + n_test]),
            "train": sorted(order[n_val + n_test :])}


def load_questions(
    split: str = "train", path: str | os.PathLike | None = None, validation_fraction: float = 0.1,
    test_fraction: float = 0.1, split_seed: int = 0,
) -> list[SquadQuestion]:
    """The questions of the articles in ``split``, in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    path = Path(path) if path else default_path()
    try:
        questions = parse(json.loads(read_text(path)))
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: {exc}") from None
    n_articles = max(q.article for q in questions) + 1
    keep = set(article_splits(n_articles, validation_fraction, test_fraction, split_seed)[split])
    out = [q for q in questions if q.article in keep]
    logger.info("SQuAD %s: %d articles, %d questions", split, len(keep), len(out))
    return out


# ---------------------------------------------------------------------------------------------- metrics
def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 between the normalised strings (the official definition: 0 when no token is shared)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def metric(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """Exact match and F1 of one prediction, each the maximum over the gold answers."""
    if not golds:
        raise ValueError("no gold answers to score against")
    return {"em": max(exact_match_score(prediction, g) for g in golds),
            "f1": max(f1_score(prediction, g) for g in golds)}


def squad_task(
    variant: str = "c_qa", split: str = "train", path: str | os.PathLike | None = None,
    validation_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0, answer_eos: bool = True,
    chunks: Sequence[int] = (1, 1),
) -> ExampleSet:
    """A split of SQuAD in one variant behind the task interface (see ``gradmem.tasks.dataset``); ``chunks`` the
    range of chunks of sentences per paragraph (``c_qa`` only)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SQuAD variant {variant!r}; choose one of {VARIANTS}")
    questions = load_questions(split, path, validation_fraction, test_fraction, split_seed)
    units = [sentences(q.context) for q in questions] if variant == "c_qa" else None
    return ExampleSet(f"squad-{variant}-{split}", [q.example(variant) for q in questions],
                      [q.answers for q in questions], metric, answer_eos, units=units, chunks=chunks)
