"""Tasks: example generators or loaders, each with its tokenizer needs and its metric."""

from gradmem.tasks.kv import KVTask, kv_tokenizer

__all__ = ["KVTask", "kv_tokenizer"]
