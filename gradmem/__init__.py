"""GradMem: write a context into a few memory vectors by test-time gradient descent, answer from them alone.

    from gradmem import Reader
    reader = Reader.from_pretrained(path)
    mem = reader.write(contexts)                    # mem.tensor (B, m, d), mem.stats
    reader.answer(mem, questions)                   # list[str]

``MemoryConfig.method`` picks GradMem or a baseline (rmt, full_context, no_context) behind the same calls
(``gradmem.methods``).

This package never imports Ray: it runs and is tested in a plain Python process.
"""

from gradmem.config import METHODS, MemoryConfig
from gradmem.data import Batch, Example, collate
from gradmem.memory import Memories, NonFiniteWriteError, WriteStats
from gradmem.reader import Reader
from gradmem.read import ReadOutput, read_teacher_forced
from gradmem.write import WriteOutput, write_memory

__all__ = [
    "Batch", "Example", "METHODS", "Memories", "MemoryConfig", "NonFiniteWriteError", "ReadOutput", "Reader", "WriteOutput",
    "WriteStats", "collate", "read_teacher_forced", "write_memory",
]
