"""GradMem: write a context into a few memory vectors by test-time gradient descent, answer from them alone.

    from gradmem import Reader
    reader = Reader.from_pretrained(path)
    mem = reader.write(contexts)                    # mem.tensor (B, m, d), mem.stats
    reader.answer(mem, questions)                   # list[str]

``MemoryConfig.method`` picks GradMem or a baseline (rmt, full_context, no_context) behind the same calls: each
is one ``gradmem.methods.Method`` object in a registry. ``Reader`` is the memory cell (``gradmem.cell``: the
model, its memory parameters, checkpoints) with the string API on top; data flows reader -> methods ->
write / read -> cell.

This package never imports Ray: it runs and is tested in a plain Python process.
"""

import logging

from gradmem.cell import MemoryCell
from gradmem.config import METHODS, MemoryConfig
from gradmem.data import Batch, Example, collate
from gradmem.memory import Memories, NonFiniteWriteError, WriteSetting, WriteStats
from gradmem.reader import Reader
from gradmem.read import ReadOutput, read_teacher_forced
from gradmem.write import WriteOutput, write_memory



class _RopeWindowNotice(logging.Filter):
    """Drops transformers' notice that llama3 RoPE scaling's original window (8192) exceeds a backbone's declared
    positions: the key-value backbone keeps Llama-3.2-1B's frequencies on purpose (the authors' recipe) while
    declaring the short window it is used with, and the notice would repeat at every reader load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "original_max_position_embeddings field must be less than" not in record.getMessage()


logging.getLogger("transformers.modeling_rope_utils").addFilter(_RopeWindowNotice())

__all__ = [
    "Batch", "Example", "METHODS", "Memories", "MemoryCell", "MemoryConfig", "NonFiniteWriteError", "ReadOutput", "Reader", "WriteOutput", "WriteSetting",
    "WriteStats", "collate", "read_teacher_forced", "write_memory",
]
