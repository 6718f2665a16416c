"""Tasks: example generators or loaders, each with its tokenizer needs and its metric.

- ``kv``: associative key-value retrieval, generated on the fly (``KVTask``, character tokenizer).
- ``babi``: bAbI qa1-qa20 from the released files (``babi_task``).
- ``squad``: SQuAD v1.1, the dev set split by article, in three variants (``squad_task``).

Fixed datasets are ``ExampleSet`` splits; readers trained from scratch on them use ``word_tokenizer``. Both
kinds implement ``Task`` (``base.py``), which is all the trainer and the evaluation use.
"""

from gradmem.tasks.babi import babi_task
from gradmem.tasks.base import Task
from gradmem.tasks.dataset import ExampleSet, evaluate_generated
from gradmem.tasks.kv import KVTask, kv_tokenizer
from gradmem.tasks.squad import squad_task
from gradmem.tasks.words import word_tokenizer

__all__ = ["ExampleSet", "KVTask", "Task", "babi_task", "evaluate_generated", "kv_tokenizer", "squad_task", "word_tokenizer"]
