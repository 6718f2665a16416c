"""The query service: Ray Serve + FastAPI over a memory store written by jobs/compress.py.

Memories are request inputs, not models: every replica loads the reader once, keeps an LRU cache of memories
read from the store (local or s3://), and answers the questions of concurrent requests, for different
memories, in one batched forward pass (``@serve.batch``).

API (OpenAPI at /openapi.json, docs page at /docs):
    POST /v1/query            {"doc_id" | "memory_id", "chunk"?, "questions": [...], "max_new_tokens"?}
    POST /v1/memories         {"doc_id", "text"} -> writes a memory online into the same store
    GET  /v1/memories/{id}    a memory's metadata
    GET  /healthz             liveness, reader fingerprint, memories indexed
Errors are JSON ``{"error": message, "status": code}``: 401 bad or missing API key (when GRADMEM_API_KEY or
the configured variable is set; send ``Authorization: Bearer KEY``), 404 unknown id, 409 memory written by
another reader or doc_id already holding other content, 413 text or questions over the limits, 422 malformed.
Ids are looked up in an in-memory index, never used as paths.
"""


import asyncio
import hmac
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from ray import serve

from gradmem import Memories, NonFiniteWriteError, Reader, WriteStats, methods, records
from gradmem.data import tokenize
from gradmem.store import MemoryIndex, MemoryStore
from pipelines.storage import local_dir, resolve

logger = logging.getLogger(__name__)

MEMORY_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ServeConfig:
    """Everything a replica needs; plain values so a RayService manifest can carry them as ``args``."""

    reader: str
    memories: str  # a memory store root (jobs/compress.py --output), local or s3://
    s3_endpoint: str | None = None
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch_size: int = 32  # questions answered in one forward pass (1 turns batching off)
    batch_wait_timeout_s: float = 0.01
    cache_size: int = 100_000  # memories kept per replica
    max_questions: int = 64  # per request
    max_question_chars: int = 2_000
    max_text_chars: int = 100_000  # online writes; the token limit is the reader's
    max_new_tokens: int = 64
    default_new_tokens: int = 16
    api_key_env: str = "GRADMEM_API_KEY"  # the variable holding the key; unset or empty: no key required
    refresh_interval_s: float = 5.0  # at most one re-listing of the store per interval, on unknown ids

    def validate(self) -> None:
        for name in ("replicas", "max_batch_size", "cache_size", "max_questions", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_new_tokens <= self.max_new_tokens:
            raise ValueError("default_new_tokens must be in [1, max_new_tokens]")


# ---------------------------------------------------------------------------------------------- API models
class QueryRequest(BaseModel):
    doc_id: str | None = Field(None, min_length=1, max_length=1024)
    memory_id: str | None = None
    chunk: int | None = Field(None, ge=0, description="which chunk of a chunked document (doc_id queries)")
    questions: list[str] = Field(..., min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def one_id(self) -> "QueryRequest":
        if (self.doc_id is None) == (self.memory_id is None):
            raise ValueError("give exactly one of doc_id and memory_id")
        if self.memory_id is not None and not MEMORY_ID.match(self.memory_id):
            raise ValueError("memory_id must be 32 lowercase hex characters")
        return self


class QueryResponse(BaseModel):
    memory_id: str
    doc_id: str
    reader_fingerprint: str
    answers: list[str]


class WriteRequest(BaseModel):
    doc_id: str = Field(..., min_length=1, max_length=1024)
    text: str


class WriteResponse(BaseModel):
    memory_id: str
    doc_id: str
    created: bool  # False when the same document was already stored (nothing written)
    reader_fingerprint: str


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


app = FastAPI(title="GradMem query service", version="1",
              description="Answers questions about compressed documents from their memories alone.")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "status": exc.status}, status_code=exc.status)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail), "status": exc.status_code}, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"malformed request: {problems}", "status": 422}, status_code=422)


# ---------------------------------------------------------------------------------------------- the replica
class MemoryCache:
    """LRU of memory_id -> (tensor (m, d), metadata). A miss loads the memory's whole part (its neighbours are
    likely next: a part holds documents compressed together)."""

    def __init__(self, store: MemoryStore, capacity: int):
        self.store, self.capacity = store, capacity
        self.items: OrderedDict[str, tuple[torch.Tensor, dict[str, Any]]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, entry: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        mid = entry["memory_id"]
        if mid in self.items:
            self.hits += 1
            self.items.move_to_end(mid)
            return self.items[mid]
        self.misses += 1
        table = pq.read_table(entry["part"], filesystem=self.store.fs)
        _, memories = records.from_table(table)
        meta = table.drop_columns(["memory"]).to_pylist()
        for i, row in enumerate(meta):
            self.put(row["memory_id"], memories.tensor[i], row)
        return self.items[mid]

    def put(self, mid: str, tensor: torch.Tensor, meta: dict[str, Any]) -> None:
        self.items[mid] = (tensor, meta)
        self.items.move_to_end(mid)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


@serve.deployment
@serve.ingress(app)
class GradMemService:
    def __init__(self, config: dict[str, Any]):
        from gradmem.runtime import configure_cpu

        self.cfg = ServeConfig(**config)
        configure_cpu(threads=max(1, int(self.cfg.cpus_per_replica)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reader = Reader.from_pretrained(local_dir(self.cfg.reader, self.cfg.s3_endpoint), device=device)
        self.fingerprint = self.reader.fingerprint
        target = resolve(self.cfg.memories, self.cfg.s3_endpoint)
        self.store = MemoryStore(target.filesystem, target.path)
        self.index = MemoryIndex(self.store)
        self.index.refresh()
        self.last_refresh = time.monotonic()
        self.cache = MemoryCache(self.store, self.cfg.cache_size)
        self._answer_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.api_key = os.environ.get(self.cfg.api_key_env) or None
        self.lock = asyncio.Lock()  # the reader is not thread-safe: one forward at a time per replica
        logger.info("serving %d memories from %s with reader %s", len(self.index), self.cfg.memories, self.fingerprint)

    # ------------------------------------------------------------------ helpers
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self.last_refresh >= self.cfg.refresh_interval_s:
            self.last_refresh = time.monotonic()
            added = self.index.refresh()
            if added:
                logger.info("index: %d new memories (%d in all)", added, len(self.index))

    def _entry(self, memory_id: str | None = None, doc_id: str | None = None, chunk: int | None = None) -> dict:
        for attempt in range(2):
            # by doc_id: that doc_id's own row (a twin with the same text shares the memory, not the doc_id)
            entry = self.index.entry(memory_id=memory_id, doc_id=doc_id if memory_id is None else None, chunk=chunk or 0)
            if entry is not None:
                break
            if attempt == 0:
                self._maybe_refresh()
        if entry is None:
            what = f"memory {memory_id}" if memory_id else f"document {doc_id!r}" + (f" chunk {chunk}" if chunk else "")
            raise ApiError(404, f"unknown {what}: not in {self.cfg.memories}")
        if doc_id is not None and chunk is None and entry["n_chunks"] > 1:
            raise ApiError(422, f"document {doc_id!r} was split into {entry['n_chunks']} chunks: give 'chunk' "
                           f"(0..{entry['n_chunks'] - 1})")
        if entry["fingerprint"] != self.fingerprint:
            raise ApiError(409, f"memory {entry['memory_id']} was written by reader {entry['fingerprint']}, not by the "
                           f"served reader {self.fingerprint}; rewrite it with this reader")
        return entry

    # ------------------------------------------------------------------ batched READ
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _answer_batch(self, items: list[tuple[torch.Tensor, int, list[int], int]]) -> list[str]:
        """One greedy pass for the questions of many requests, each over its own memory (m, d)."""
        async with self.lock:
            return await asyncio.to_thread(self._answer_now, items)

    def _answer_now(self, items: list[tuple[torch.Tensor, int, list[int], int]]) -> list[str]:
        """items: (memory (P, d), context tokens, question token ids, max new tokens)."""
        out: list[str | None] = [None] * len(items)
        for budget in sorted({item[3] for item in items}):  # requests asking for different lengths: one pass each
            picked = [i for i, item in enumerate(items) if item[3] == budget]
            tensor = torch.stack([items[i][0] for i in picked])  # (b, P, d)
            b = len(picked)
            n_tokens = torch.tensor([items[i][1] for i in picked])  # full_context readers need the real rows
            memories = Memories(tensor, WriteStats(torch.zeros(b, 1), torch.zeros(b), n_tokens), self.fingerprint,
                                0, 0.0)
            for i, answer in zip(picked, self.reader.answer_tokens(memories, [items[i][2] for i in picked], budget,
                                                                   batch_size=len(picked))):
                out[i] = answer
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ routes
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "reader_fingerprint": self.fingerprint, "memories": len(self.index),
                "cache": {"size": len(self.cache.items), "hits": self.cache.hits, "misses": self.cache.misses}}

    @app.post("/v1/query", response_model=QueryResponse)
    async def query(self, body: QueryRequest, request: Request) -> QueryResponse:
        self._authorize(request)
        if len(body.questions) > self.cfg.max_questions:
            raise ApiError(413, f"{len(body.questions)} questions: at most {self.cfg.max_questions} per request")
        if any(len(q) > self.cfg.max_question_chars for q in body.questions):
            raise ApiError(413, f"a question is over {self.cfg.max_question_chars} characters")
        budget = body.max_new_tokens or self.cfg.default_new_tokens
        if budget > self.cfg.max_new_tokens:
            raise ApiError(413, f"max_new_tokens {budget} is over this service's limit of {self.cfg.max_new_tokens}")
        entry = self._entry(body.memory_id, body.doc_id, body.chunk)
        tensor, meta = self.cache.get(entry)
        if not torch.isfinite(tensor).all():
            raise ApiError(409, f"memory {entry['memory_id']} holds NaN/inf and cannot be read")
        n_tokens = meta["n_context_tokens"]
        rows = int(methods.prefix_lengths(self.reader, tensor[None], torch.tensor([n_tokens]))[0])
        q_ids = tokenize(self.reader.tokenizer, body.questions)  # once: checked here, answered from these ids
        try:  # here, not in the batch: one bad question must not fail a batch shared with other requests
            self.reader.check_questions([rows] * len(q_ids), q_ids, budget)
        except ValueError as e:
            raise ApiError(413, str(e)) from e
        answers = await asyncio.gather(*(self._answer_batch((tensor, n_tokens, q, budget)) for q in q_ids))
        return QueryResponse(memory_id=entry["memory_id"], doc_id=entry["doc_id"], reader_fingerprint=self.fingerprint,
                             answers=list(answers))

    @app.post("/v1/memories", response_model=WriteResponse)
    async def write(self, body: WriteRequest, request: Request) -> WriteResponse:
        self._authorize(request)
        if len(body.text) > self.cfg.max_text_chars:
            raise ApiError(413, f"text of {len(body.text)} characters: at most {self.cfg.max_text_chars}")
        if not body.text.strip():
            raise ApiError(422, "text is empty: there is nothing to write")
        async with self.lock:
            return await asyncio.to_thread(self._write_now, body)

    def _write_now(self, body: WriteRequest) -> WriteResponse:
        ids = tokenize(self.reader.tokenizer, [body.text])[0]
        if not ids:
            raise ApiError(422, "text has no tokens: there is nothing to write")
        if len(ids) > self.reader.max_context_tokens:
            raise ApiError(413, f"text has {len(ids)} tokens, over the reader's maximum of {self.reader.max_context_tokens}")
        self._maybe_refresh()
        steps, lr = self.reader.config.write_steps, self.reader.config.write_lr
        mid = records.memory_id(self.fingerprint, steps, lr, ids)
        known = self.index.by_doc.get((body.doc_id, 0))
        if known == mid:
            return WriteResponse(memory_id=mid, doc_id=body.doc_id, created=False, reader_fingerprint=self.fingerprint)
        if known is not None:
            raise ApiError(409, f"document {body.doc_id!r} is already stored with other content (memory {known}); "
                           "use a new doc_id")
        start = time.perf_counter()
        try:
            memories = self.reader.write_tokens([ids], steps, lr)
        except NonFiniteWriteError as e:
            raise ApiError(422, f"the WRITE produced NaN/inf for this text: {e}") from e
        greedy = self.reader.reconstruct(memories, [ids]).tolist()
        table = records.to_table(memories, [body.doc_id], [ids], write_time_s=time.perf_counter() - start,
                                 recon_greedy=greedy)
        part = self.store.write_part("memories", table)
        self.index.add({"memory_id": mid, "doc_id": body.doc_id, "chunk": 0, "n_chunks": 1, "part": part,
                        "fingerprint": self.fingerprint})
        self.index.parts.add(part)
        self.cache.put(mid, memories.tensor[0], table.drop_columns(["memory"]).to_pylist()[0])
        return WriteResponse(memory_id=mid, doc_id=body.doc_id, created=True, reader_fingerprint=self.fingerprint)

    @app.get("/v1/memories/{memory_id}")
    async def metadata(self, memory_id: str, request: Request) -> dict:
        self._authorize(request)
        if not MEMORY_ID.match(memory_id):
            raise ApiError(422, "memory_id must be 32 lowercase hex characters")
        entry = self._entry(memory_id=memory_id)
        _, meta = self.cache.get(entry)
        return {**meta, "reader_fingerprint": entry["fingerprint"]}


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``ServeConfig(**args)`` (also the import path of a RayService:
    ``pipelines.serve:build_app``)."""
    cfg = ServeConfig(**args)
    cfg.validate()
    actor_options: dict[str, Any] = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    key = os.environ.get(cfg.api_key_env)
    if key:  # handed to the replicas from the deploying process; on Kubernetes prefer a Secret in the pod env
        actor_options["runtime_env"] = {"env_vars": {cfg.api_key_env: key}}
    deployment = GradMemService.options(
        num_replicas=cfg.replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=max(64, 2 * cfg.max_batch_size),
    )
    return deployment.bind(asdict(cfg))
