"""bAbI question answering (Weston et al. 2015, v1.2), read from the released text files.

File format (``qaN_<name>_{train,test}.txt``): numbered lines; a story restarts when the number goes back to 1;
a question line is ``ID question<TAB>answer<TAB>supporting fact ids``. Each question is one example, built as
the paper's reference code builds it (BABILong with no distractor text, "0k"):

- context: every statement of the story before the question, in order, joined by single spaces (earlier
  questions of the same story are left out). Not only the supporting facts: finding them is the task.
- query: the question as given, e.g. ``"Where is Mary?"``.
- target: the answer as given, with a leading space (``" bathroom"``), so a BPE tokenizer sees the word as it
  appears in running text; the word-level tokenizer splits words the same way.

Splits: ``test`` is the released test file. ``train`` and ``validation`` are carved from the released train file
by story (all questions of a story share its statements, so a story never straddles two splits): a fraction
``validation_fraction`` (default 0.1) of each task's stories, chosen by a permutation seeded with
``split_seed``. Every story of qa1-qa3 and qa5 holds 5 questions and every story of qa4 one, so this is
exactly 10% of the questions.

Sets: ``en`` (1,000 training questions per task) and ``en-10k`` (10,000), as released. The paper's runs use the
10k training data (BABILong's 0k split of ``en-valid-10k``: 9,000 train and 1,000 validation questions, tested on
the 1,000 test questions). Here ``en-10k/qa3_three-supporting-facts_train.txt`` is missing (see
the data directory's README.md): qa3 is available with ``set="en"`` only.

Files: ``task.path`` (the ``tasks_1-20_v1-2`` directory), else ``$GRADMEM_DATA/babi/tasks_1-20_v1-2``.

Metric: exact match of the answer word, after lower-casing and collapsing whitespace.

Multi-chunk form (``chunks=(lo, hi)``): the story before a question is split into c chunks of consecutive
statements (the units; ``gradmem.tasks.dataset``), each written into its own memory; the supporting facts may sit
in any chunk, and the latest one wins, so the READ must find them across memories in order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from gradmem.data import Example
from gradmem.tasks.dataset import ExampleSet, data_root, read_text

logger = logging.getLogger(__name__)

SETS = ("en", "en-10k")
SPLITS = ("train", "validation", "test")
TASK_NAMES = tuple(f"qa{i}" for i in range(1, 21))


def default_root() -> Path:
    """The released bAbI files under ``$GRADMEM_DATA`` (FileNotFoundError naming task.path and GRADMEM_DATA when
    it is unset)."""
    return data_root("the bAbI tasks_1-20_v1-2 directory") / "babi" / "tasks_1-20_v1-2"


@dataclass(frozen=True)
class BabiQuestion:
    """One question with the story statements before it."""

    task: str  # "qa1"
    story: int  # index of the story in its file
    facts: tuple[str, ...]  # the story's statements up to the question, in order
    question: str
    answer: str
    supporting: tuple[int, ...]  # line ids (within the story) of the supporting facts

    def example(self) -> Example:
        return Example(context=" ".join(self.facts), query=self.question, target=" " + self.answer)


def parse(text: str, task: str = "") -> list[BabiQuestion]:
    """Every question of a bAbI file's text, in file order. Raises ValueError on a malformed line."""
    questions: list[BabiQuestion] = []
    story, expected = -1, 1
    facts: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number, _, rest = line.partition(" ")
        if not _is_id(number) or not rest:
            raise ValueError(f"{task or 'bAbI'} line {lineno}: expected 'ID text', got {line!r}")
        line_id = int(number)
        if line_id == 1:
            story, expected, facts = story + 1, 1, []
        if line_id != expected or story < 0:
            raise ValueError(f"{task or 'bAbI'} line {lineno}: id {line_id} where {expected} was expected")
        expected += 1
        if "\t" not in rest:
            facts.append(rest.strip())
            continue
        fields = rest.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{task or 'bAbI'} line {lineno}: a question line needs question, answer and "
                             f"supporting ids separated by tabs, got {line!r}")
        question, answer, supporting = (f.strip() for f in fields)
        ids = supporting.split()
        if not question or not answer or not all(_is_id(s) and int(s) < line_id for s in ids):
            raise ValueError(f"{task or 'bAbI'} line {lineno}: a question line needs a question, an answer and the "
                             f"ids of earlier lines of its story as supporting facts, got {line!r}")
        questions.append(BabiQuestion(task, story, tuple(facts), question, answer, tuple(int(s) for s in ids)))
    return questions


def _is_id(text: str) -> bool:
    """A line id: ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def task_file(root: str | os.PathLike, babi_set: str, task: str, part: str) -> Path:
    """The released file of ``task`` (``"qa1"``) in ``babi_set``; ``part`` is ``train`` or ``test``."""
    if babi_set not in SETS:
        raise ValueError(f"unknown bAbI set {babi_set!r}; choose one of {SETS}")
    if task not in TASK_NAMES:
        raise ValueError(f"unknown bAbI task {task!r}; choose among qa1 .. qa20")
    folder = Path(root) / babi_set
    found = sorted(folder.glob(f"{task}_*_{part}.txt"))
    if len(found) != 1:
        hint = " (en-10k lacks qa3's train file here: use set en)" if babi_set == "en-10k" and task == "qa3" else ""
        raise FileNotFoundError(f"no single {task} {part} file in {folder}{hint}")
    return found[0]


def load_questions(
    tasks: Sequence[str] = ("qa1",), split: str = "train", babi_set: str = "en-10k",
    root: str | os.PathLike | None = None, validation_fraction: float = 0.1, split_seed: int = 0,
) -> list[BabiQuestion]:
    """The questions of ``split`` for each task in ``tasks``, task after task, each in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if not tasks:
        raise ValueError("no bAbI tasks given")
    root = Path(root) if root else default_root()
    out: list[BabiQuestion] = []
    for task in tasks:
        part = "test" if split == "test" else "train"
        path = task_file(root, babi_set, task, part)
        try:
            questions = parse(read_text(path), task)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if not questions:
            raise ValueError(f"{path}: no questions")
        if split != "test":
            held_out = validation_stories(max(q.story for q in questions) + 1, validation_fraction, split_seed)
            questions = [q for q in questions if (q.story in held_out) == (split == "validation")]
        out.extend(questions)
    logger.info("bAbI %s %s %s: %d questions", babi_set, ",".join(tasks), split, len(out))
    return out


def validation_stories(n_stories: int, fraction: float, seed: int) -> set[int]:
    """The story indices held out for validation: ``round(fraction * n)`` of them, by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n_stories)
    return set(order[: round(fraction * n_stories)].tolist())


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed to single spaces, no leading or trailing space."""
    return " ".join(text.lower().split())


def exact_match(prediction: str, answer: str) -> bool:
    """The answer word exactly, up to case and whitespace (``" Bathroom "`` matches ``"bathroom"``)."""
    return normalize(prediction) == normalize(answer)


def metric(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    return {"em": float(any(exact_match(prediction, g) for g in golds))}


def babi_task(
    tasks: Sequence[str] = ("qa1",), split: str = "train", babi_set: str = "en-10k",
    root: str | os.PathLike | None = None, validation_fraction: float = 0.1, split_seed: int = 0,
    answer_eos: bool = True, chunks: Sequence[int] = (1, 1),
) -> ExampleSet:
    """A split of bAbI behind the task interface (``examples`` / ``batch``; see ``gradmem.tasks.dataset``);
    ``chunks`` the range of chunks of statements per story."""
    questions = load_questions(tasks, split, babi_set, root, validation_fraction, split_seed)
    name = f"babi-{babi_set}-{'+'.join(tasks)}-{split}"
    return ExampleSet(name, [q.example() for q in questions], [(q.answer,) for q in questions], metric, answer_eos,
                      units=[q.facts for q in questions], chunks=chunks)

