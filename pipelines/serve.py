"""The query service: Ray Serve + FastAPI over a memory store written by jobs/compress.py.

Memories are request inputs, not models: every replica loads the reader once, keeps an LRU cache of memories
read from the store (local or s3://), and answers the questions of concurrent requests, for different
memories, in one batched forward pass (``@serve.batch``).

API (OpenAPI at /openapi.json, docs page at /docs):
    POST /v1/query            {"doc_id" | "memory_id", "chunk"?, "questions": [...], "max_new_tokens"?,
                               "chunk_tokens"?, "chunk_overlap"?}
    POST /v1/memories         {"doc_id", "text"} -> writes a memory online into the same store
    GET  /v1/memories/{id}    a memory's metadata
    GET  /healthz             liveness, reader fingerprint, memories indexed, the store's chunking
A chunked document (the batch job's --chunk) is answered over all its chunks at once: ``{"doc_id", "questions"}``
reads ``[M_1; ...; M_c; Q]`` (``gradmem.read.compose``), its chunk memories in chunk order wherever the store's
parts hold them, at most ``max_chunks_per_query`` of them (413 past it); a chunk missing from the store is a 409,
never an answer from part of the document. ``{"doc_id", "chunk"}`` reads that one chunk. Requests of documents
with different chunk counts share a batch (the composed READ pads them). A request may say which chunking it
assumes (``chunk_tokens``, ``chunk_overlap``, e.g. because it numbered chunks by token offsets): under any other
than the store's it is refused (409).
Every error, whatever raised it (a route, validation, routing, an unexpected exception), is JSON
``{"error": message, "status": code}`` (``error_response``): 401 bad or missing API key (when a key is set;
send ``Authorization: Bearer KEY``; everything but /healthz needs it, /docs and /openapi.json included), 404
unknown id or route, 405 wrong method, 409 memory written by another reader or doc_id already holding other
content, 413 body, text or questions over the limits, 415 a body that is not JSON, 422 malformed (a lone
surrogate such as ``"\\ud800"`` included), 500 an unexpected failure (logged here, never its trace to the client).
The key is checked and the body's size capped (``max_body_bytes``, while it is read) before the body is parsed.
Ids are looked up in an in-memory index, never used as paths; no message names the store's location.
See SECURITY.md for what the service trusts and what an operator must do on a shared cluster.
Metrics (pipelines/metrics.py, through Ray's Prometheus export): requests and latency per route template and
status (recorded in ``Guard``, so refusals count too), READ batch sizes, cache hits and misses, online writes.
Replicas: a fixed ``replicas``, or Serve autoscaling with ``max_replicas`` (``ServeConfig.scaling``).
The served reader: the one the store's served-reader pointer names (else ``reader``); after an upgrade each replica
switches within ``reader_check_interval_s``, every request answered wholly by one reader (pipelines/served.py).
"""


import asyncio
import hashlib
import hmac
import json
import logging
import os
import stat
import re
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Awaitable, Callable, Iterator, NamedTuple

import pyarrow.parquet as pq
import torch
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, Field, StrictInt, StringConstraints, model_validator
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradmem import NonFiniteWriteError, Reader, records
from gradmem.chunking import Chunking
from gradmem.config import declared, from_dict, override
from gradmem.data import tokenize
from gradmem.store import IncompleteDocument, MemoryIndex, MemoryStore
from pipelines.metrics import UNMATCHED_ROUTE, ServeMetrics
from pipelines.served import PointerWatch, Served, initial_reader, load_served
from pipelines.storage import resolve

logger = logging.getLogger(__name__)

MEMORY_ID_PATTERN = r"^[0-9a-f]{32}$"  # JSON Schema (ECMA) semantics: $ is the end of the text
_MEMORY_ID = re.compile(r"[0-9a-f]{32}")  # used with fullmatch: "…\n" does not pass, as it would with re.match + $
MAX_INT32 = 2**31 - 1  # chunk and n_context_tokens are int32 columns; no count here needs more
PUBLIC_PATHS = frozenset({"/healthz"})  # liveness probes carry no key


@declared
class ServeConfig:
    """Everything a replica needs; plain values so a RayService manifest can carry them as ``args``
    (frozen, validated on construction; jobs/serve.py's flags are its fields)."""

    reader: str = Field(description="reader directory (local or s3://)")
    memories: str = Field(description="a memory store root (jobs/compress.py --output), local or s3://")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (None: AWS_ENDPOINT_URL)")
    replicas: int = Field(1, ge=1, description="Serve replicas of the reader deployment (with max_replicas: the "
                          "replicas it starts with)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling floor (None: replicas); needs max_replicas")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling ceiling: set it to scale on load (None: a "
                                     "fixed number of replicas)")
    target_ongoing_requests: float | None = Field(None, gt=0, description="ongoing requests per replica autoscaling "
                                                  "aims at (None: Ray Serve's default); needs max_replicas")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs each replica reserves")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs each replica reserves")
    max_batch_size: int = Field(32, ge=1, description="questions answered in one forward pass (1 turns batching off)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    cache_size: int = Field(100_000, ge=1, description="memories kept per replica")
    cache_bytes: int = Field(2 * 2**30, ge=1, description="and at most this many bytes of them (tensors plus an "
                             "estimate of their metadata)")
    max_questions: int = Field(64, ge=1, description="questions per request")
    max_question_chars: int = Field(2_000, ge=1, description="characters per question")
    max_text_chars: int = Field(100_000, ge=1, description="characters of an online write's text (the token limit "
                                "is the reader's)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="a request body over this is refused (413) while it is "
                                "read, before parsing")
    max_new_tokens: int = Field(64, ge=1, description="the most answer tokens a request may ask for")
    max_chunks_per_query: int = Field(16, ge=1, description="the most chunk memories one query over a whole "
                                      "document reads (composed READ); a longer document: 413 (ask by chunk)")
    default_new_tokens: int = Field(16, ge=1, description="answer tokens when a request does not say")
    api_key_env: str = Field("GRADMEM_API_KEY", description="the variable holding the key; unset or empty: no key "
                             "required")
    api_key_file: str | None = Field(None, min_length=1, description="or a file on every node holding the key (e.g. "
                                     "a mounted Secret); never set together with the variable")
    # Set by build_app from the deploying process's key: "sha256:<salt hex>:<digest hex>". Deployment arguments
    # can show up in Ray's views; a salted hash of a high-entropy key reveals nothing usable, the key would.
    api_key_sha256: str | None = Field(None, description="set by build_app from the key; never the key itself")
    refresh_interval_s: float = Field(5.0, ge=0, description="at most one re-listing of the store per interval, on "
                                      "unknown ids")
    reader_check_interval_s: float = Field(10.0, ge=0, description="how often a replica reads the store's "
                                           "served-reader pointer and switches to the reader an upgrade named "
                                           "(pipelines/served.py); 0: never")

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError("default_new_tokens must be <= max_new_tokens")
        if self.api_key_sha256 is not None:
            KeyDigest.parse(self.api_key_sha256)
        if self.max_replicas is None:
            if self.min_replicas is not None or self.target_ongoing_requests is not None:
                raise ValueError("min_replicas and target_ongoing_requests are autoscaling settings: set max_replicas")
        elif not self.floor_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"replicas ({self.replicas}, the starting count) must lie within min_replicas "
                             f"({self.floor_replicas}) and max_replicas ({self.max_replicas})")
        return self

    @property
    def floor_replicas(self) -> int:
        return self.replicas if self.min_replicas is None else self.min_replicas

    def scaling(self) -> dict[str, Any]:
        """The deployment's replica options: a fixed ``num_replicas``, or Serve's ``autoscaling_config`` starting
        at ``replicas`` (one place says how the settings map to Serve; the load test records the same dict)."""
        if self.max_replicas is None:
            return {"num_replicas": self.replicas}
        auto: dict[str, Any] = {"min_replicas": self.floor_replicas, "max_replicas": self.max_replicas,
                                "initial_replicas": self.replicas}
        if self.target_ongoing_requests is not None:
            auto["target_ongoing_requests"] = self.target_ongoing_requests
        return {"autoscaling_config": auto}


# ---------------------------------------------------------------------------------------------- the API key
@dataclass(frozen=True)
class KeyDigest:
    """A salted SHA-256 of the API key: what travels to the replicas and what they keep, never the key itself."""

    salt: bytes
    digest: bytes

    @classmethod
    def of(cls, key: str, salt: bytes | None = None) -> "KeyDigest":
        salt = os.urandom(16) if salt is None else salt
        return cls(salt, hashlib.sha256(salt + key.encode()).digest())

    @classmethod
    def parse(cls, text: str) -> "KeyDigest":
        try:
            scheme, salt, digest = text.split(":")
            if scheme != "sha256":
                raise ValueError(scheme)
            return cls(bytes.fromhex(salt), bytes.fromhex(digest))
        except ValueError:
            raise ValueError("api_key_sha256 must be 'sha256:<salt hex>:<digest hex>'") from None

    def __str__(self) -> str:
        return f"sha256:{self.salt.hex()}:{self.digest.hex()}"

    def matches(self, token: str) -> bool:
        """Constant time in the token's content: no timing tells how much of a guess was right."""
        given = hashlib.sha256(self.salt + token.encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(given, self.digest)


def checked_key(raw: str, where: str) -> str:
    """The key as a client sends it: surrounding whitespace stripped (a Secret's file or variable often ends in a
    newline, which no header can carry), and only visible ASCII: a header is read as Latin-1 while a client sends
    UTF-8, so a key of other characters could never match, and a service no client can use is refused at start
    instead. Blank (after stripping) is refused too: a key was meant, so the service must not run open."""
    key = raw.strip()
    if not key:
        raise ValueError(f"the API key in {where} is blank")
    if not all("!" <= ch <= "~" for ch in key):
        raise ValueError(f"the API key in {where} holds characters no client could send in a header (non-ASCII, "
                         "spaces or control characters): use letters, digits and punctuation, e.g. openssl rand -hex 32")
    return key


MAX_KEY_FILE_BYTES = 4096  # a key is tens of bytes; a bigger "key file" is a wrong path, never read whole


def file_key(path: str) -> str:
    """The key in an api_key_file: a regular file of at most ``MAX_KEY_FILE_BYTES`` UTF-8 bytes (checked before it is
    opened: a FIFO would block the replica's start forever, a huge file fill its memory), else one ValueError
    naming the file. Fail closed: the replica does not start."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_KEY_FILE_BYTES:
            raise ValueError(f"the API key file {path} is not a regular file of at most {MAX_KEY_FILE_BYTES} bytes")
        with open(path, "rb") as f:
            raw = f.read(MAX_KEY_FILE_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"the API key file {path} cannot be read as text: {type(exc).__name__}") from None
    return checked_key(raw, f"the file {path}")


def env_key(cfg: ServeConfig) -> str | None:
    """The key in ``cfg.api_key_env`` (checked: ``checked_key``); None when the variable is unset or empty."""
    raw = os.environ.get(cfg.api_key_env)
    return checked_key(raw, f"${cfg.api_key_env}") if raw else None


def replica_key(cfg: ServeConfig) -> KeyDigest | None:
    """The key a replica checks: the hash from build_app, else the key file, else the variable on the node.
    A configured key file that cannot be read stops the replica (fail closed, never open)."""
    if cfg.api_key_sha256:
        return KeyDigest.parse(cfg.api_key_sha256)
    if cfg.api_key_file is not None:
        return KeyDigest.of(file_key(cfg.api_key_file))
    key = env_key(cfg)
    return KeyDigest.of(key) if key else None


# ---------------------------------------------------------------------------------------------- API models
def _valid_unicode(value: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"): valid JSON, not text. The tokenizer and every UTF-8
    encoder fail on it, so it is refused here, as malformed input, for every string a client sends."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate at position {e.start}") from None
    return value


def _memory_id(value: str) -> str:
    if not _MEMORY_ID.fullmatch(value):
        raise ValueError("memory_id must be exactly 32 lowercase hex characters")
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
DocId = Annotated[str, StringConstraints(min_length=1, max_length=records.MAX_ID_CHARS), AfterValidator(_valid_unicode)]
MemoryId = Annotated[str, StringConstraints(pattern=MEMORY_ID_PATTERN), AfterValidator(_memory_id)]
Chunk = Annotated[StrictInt, Field(ge=0, le=MAX_INT32, description="which chunk of a chunked document (doc_id)")]
NewTokens = Annotated[StrictInt, Field(ge=1, le=MAX_INT32, description="answer length; over the service's limit: 413")]
ChunkTokens = Annotated[StrictInt, Field(ge=1, le=MAX_INT32, description="the chunk size the request assumes "
                                         "(409 when the store was chunked otherwise)")]
ChunkOverlap = Annotated[StrictInt, Field(ge=0, le=MAX_INT32, description="the chunk overlap the request assumes "
                                          "(409 when the store was chunked otherwise)")]


class QueryRequest(BaseModel):
    doc_id: DocId | None = None
    memory_id: MemoryId | None = None
    chunk: Chunk | None = None
    questions: list[Text] = Field(..., min_length=1)
    max_new_tokens: NewTokens | None = None
    chunk_tokens: ChunkTokens | None = None
    chunk_overlap: ChunkOverlap | None = None

    @model_validator(mode="after")
    def one_id(self) -> "QueryRequest":
        if (self.doc_id is None) == (self.memory_id is None):
            raise ValueError("give exactly one of doc_id and memory_id")
        return self


class QueryResponse(BaseModel):
    memory_id: str  # the memory read; over a whole chunked document, its first chunk's (all in memory_ids)
    doc_id: str
    reader_fingerprint: str
    answers: list[str]
    memory_ids: list[str]  # every memory the READ composed, in chunk order
    chunks: list[int]  # their chunk numbers


class WriteRequest(BaseModel):
    doc_id: DocId
    text: Text


class WriteResponse(BaseModel):
    memory_id: str
    doc_id: str
    created: bool  # False when the same document was already stored (nothing written)
    reader_fingerprint: str


class ErrorBody(BaseModel):
    """The one error shape of the whole service."""

    error: str
    status: int


ERROR_MEANINGS = {
    401: "missing or wrong API key (when the service has one)",
    404: "unknown memory or document",
    409: "the memory was written by another reader, holds NaN/inf, or the doc_id already holds other content; a "
         "chunk of the document is missing from the store; the request assumes another chunking than the store's",
    413: "body, text, questions, answer length or a document's chunks over the service's limits",
    415: "the body is not JSON",
    422: "malformed request",
    500: "unexpected failure (logged by the service)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the one error schema."""
    return {code: {"model": ErrorBody, "description": ERROR_MEANINGS[code]} for code in codes}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """Every error the service sends is built here. ``ensure_ascii``: a message can never fail to encode."""
    body = json.dumps({"error": message, "status": status}, ensure_ascii=True).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


# ---------------------------------------------------------------------------------------------- before routing
@dataclass(frozen=True)
class GuardSettings:
    key: KeyDigest | None
    max_body_bytes: int
    metrics: ServeMetrics | None = None  # requests and latency per route template and status


class _Disconnected(Exception):
    pass


class Guard:
    """Pure ASGI middleware in front of routing and parsing: the key is checked first, then the body is read
    with a cap (a Content-Length over the limit is refused before one byte is read, a stream is cut at the limit)
    and only then handed to FastAPI, which parses a body known to be small and from a known client.

    ``settings`` lives on the class: Ray Serve copies the FastAPI app into each replica, this class travels by
    reference, so the replica's constructor (``Guard.configure``) reaches the instance that serves. Until it is
    configured every request is refused (fail closed)."""

    settings: GuardSettings | None = None

    def __init__(self, app: ASGIApp):
        self.app = app

    @classmethod
    def configure(cls, settings: GuardSettings) -> None:
        cls.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = Guard.settings
        if settings is None or settings.metrics is None:
            await self._guarded(scope, receive, send, settings)
            return
        status: list[int | None] = [None]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self._guarded(scope, receive, sending, settings)
        finally:  # every request, refused ones included; "none": the client left before any response
            settings.metrics.request(route_template(scope), status[0] or "none", time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, settings: GuardSettings | None) -> None:
        refusal = (500, "the service is not configured yet") if settings is None else _refusal(scope, settings)
        if refusal is not None:
            status, message = refusal
            challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else None  # RFC 6750
            await error_response(status, message, headers=challenge)(scope, receive, send)
            return
        try:
            body = await _read_body(receive, settings.max_body_bytes)
        except _Disconnected:
            return
        if body is None:
            await error_response(413, f"request body over {settings.max_body_bytes} bytes")(scope, receive, send)
            return
        if not _is_utf8(body):  # JSON is UTF-8 (RFC 8259); FastAPI would answer 400 outside the documented set
            await error_response(422, "malformed request: the body is not UTF-8")(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def route_template(scope: Scope) -> str:
    """The template of the app's route this request matches (``/v1/memories/{memory_id}``), also for a wrong
    method (405), else ``unmatched``: a metric label with a bounded set of values, never the raw path."""
    for route in _leaf_routes(app.routes):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", UNMATCHED_ROUTE)
    return UNMATCHED_ROUTE


def _leaf_routes(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    """The app's routes with FastAPI's included routers opened (Serve's ingress puts the class's routes in one;
    an included router matches without saying which of its routes did)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _refusal(scope: Scope, settings: GuardSettings) -> tuple[int, str] | None:
    """Why this request is refused before its body is read (None: it is not)."""
    if settings.key is not None and _route_path(scope) not in PUBLIC_PATHS:
        given = _header(scope, b"authorization") or ""
        token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        if not settings.key.matches(token):
            return 401, "missing or wrong API key: send 'Authorization: Bearer <key>'"
    length = _header(scope, b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > settings.max_body_bytes:
        return 413, f"request body of {int(length)} bytes: at most {settings.max_body_bytes}"
    content_type = _header(scope, b"content-type")
    if scope.get("method") in ("POST", "PUT", "PATCH") and content_type is not None:
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return 415, "the body must be JSON (Content-Type: application/json)"
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes (the rest is never read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A ``receive`` that hands the already-read body over once, then the client's later messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


app = FastAPI(title="GradMem query service", version="1",
              description="Answers questions about compressed documents from their memories alone. Errors are "
                          "`{\"error\": message, \"status\": code}`; with a key set, send `Authorization: Bearer KEY`.")
app.add_middleware(Guard)  # before @serve.ingress below: Serve copies the app as it is then
# No redirect from "/v1/query/" to "/v1/query": Starlette's 307 would be outside the declared statuses and point at
# whatever Host the client sent; an unknown path is a 404 in the one error shape
app.router.redirect_slashes = False


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.message)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
    """Routing's own errors (404 unknown route, 405 wrong method with its Allow header) in the same shape. FastAPI's
    400 for a UTF-8 body its JSON parser gives up on (nested too deeply, an integer over Python's digit limit) is a
    malformed request like any other: 422, as the OpenAPI document declares."""
    if exc.status_code == 400:
        return error_response(422, "malformed request: the body is not JSON this service can parse (nested too "
                                   "deeply, or a number over the parser's limits)")
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors())
    return error_response(422, f"malformed request: {problems}")


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    """The trace goes to the replica's log, the client gets the shape and nothing about the internals."""
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error: the service logged it")


# ---------------------------------------------------------------------------------------------- the batched READ
class ReadItem(NamedTuple):
    """One question of a request, as it joins a READ batch (checked by the replica before it joins)."""

    memories: torch.Tensor  # (c, P, d) its document's memories in chunk order (c = 1: one memory)
    rows: torch.Tensor  # (c,) rows of each the READ sees
    q_ids: list[int]  # the question's token ids
    budget: int  # max new tokens
    reader: Reader | None = None  # the request's reader (pipelines/served.py); None: the caller's one reader


def answer_items(reader: Reader, items: list[ReadItem]) -> list[str]:
    """Greedy answers to a batch of questions from different requests, each over its own document's memories
    composed in chunk order (``[M_1; ...; M_c; Q]``): documents with different chunk counts share one pass, the
    composed READ pads them. Requests asking for different answer lengths get one pass per length."""
    out: list[str | None] = [None] * len(items)
    for budget in sorted({item.budget for item in items}):
        picked = [i for i, item in enumerate(items) if item.budget == budget]
        tensor = torch.cat([items[i].memories for i in picked])  # (N, P, d), N = sum of the c's, item after item
        rows = torch.cat([items[i].rows for i in picked])  # (N,)
        chunks = [items[i].memories.shape[0] for i in picked]  # (b,)
        answers = reader.generate_answers(tensor, rows, [items[i].q_ids for i in picked], budget,
                                          batch_size=len(picked), chunks=chunks)
        for i, answer in zip(picked, answers):
            out[i] = answer
    return out  # type: ignore[return-value]


def answer_by_reader(items: list[ReadItem]) -> list[str]:
    """``answer_items`` per reader: each request is answered by the reader it started with, so a batch that an
    upgrade's switch left holding requests of the old reader and the new never mixes them."""
    out: list[str | None] = [None] * len(items)
    readers = {id(item.reader): item.reader for item in items}
    for key, reader in readers.items():
        picked = [i for i, item in enumerate(items) if id(item.reader) == key]
        for i, answer in zip(picked, answer_items(reader, [items[i] for i in picked])):
            out[i] = answer
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- the replica
def _approx_bytes(tensor: torch.Tensor, meta: dict[str, Any]) -> int:
    """A memory's weight in the cache: its tensor plus a rough size of its metadata row."""
    return tensor.element_size() * tensor.nelement() + 64 * len(meta) + sum(len(str(v)) for v in meta.values())


class MemoryCache:
    """LRU of memory_id -> (tensor (m, d), metadata), bounded by count and by bytes. A miss loads the memory's
    whole part (its neighbours are likely next: a part holds documents compressed together); each row is copied
    out of the part's tensor so that evicting a row frees its bytes. Not thread-safe: callers hold a lock.
    ``on_lookup(hit)`` reports each lookup (the replica's metrics)."""

    def __init__(self, store: MemoryStore, capacity: int, capacity_bytes: int,
                 on_lookup: Callable[[bool], None] | None = None):
        self.store, self.capacity, self.capacity_bytes = store, capacity, capacity_bytes
        self.on_lookup = on_lookup
        self.items: OrderedDict[str, tuple[torch.Tensor, dict[str, Any]]] = OrderedDict()
        self.sizes: dict[str, int] = {}
        self.bytes = self.hits = self.misses = 0

    def get(self, entry: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        mid = entry["memory_id"]
        if self.on_lookup is not None:
            self.on_lookup(mid in self.items)
        if mid in self.items:
            self.hits += 1
            self.items.move_to_end(mid)
            return self.items[mid]
        self.misses += 1
        table = pq.read_table(entry["part"], filesystem=self.store.fs)
        _, memories = records.from_table(table)
        wanted = None
        for i, row in enumerate(table.drop_columns(["memory"]).to_pylist()):
            item = (memories.tensor[i].clone(), row)
            self.put(row["memory_id"], *item)
            wanted = item if row["memory_id"] == mid else wanted
        if wanted is None:
            raise LookupError(f"memory {mid} is not in the part the index names")
        return wanted

    def put(self, mid: str, tensor: torch.Tensor, meta: dict[str, Any]) -> None:
        self.bytes -= self.sizes.pop(mid, 0)
        self.items[mid] = (tensor, meta)
        self.items.move_to_end(mid)
        self.sizes[mid] = _approx_bytes(tensor, meta)
        self.bytes += self.sizes[mid]
        while self.items and (len(self.items) > self.capacity or self.bytes > self.capacity_bytes):
            old, _ = self.items.popitem(last=False)
            self.bytes -= self.sizes.pop(old)


def _node_host() -> str:
    """This node's address as Ray knows it (the one it was started with), bracketed for IPv6."""
    import ray

    ip = ray.util.get_node_ip_address()
    return f"[{ip}]" if ":" in ip else ip


def bind_internal_grpc_to_node() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0" (every interface) right
    after the deployment's constructor, with no option to choose the address. Nothing here uses that channel
    (no deployment calls another), and it must not face the network: in this replica process, wrap the helper
    Ray binds it with so that the wildcard becomes the node's own address. Checked by
    tests/test_serve.py::test_replica_listens_on_the_node_address_only."""
    from ray.serve._private import replica as replica_module

    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None:
        logger.warning("Ray Serve changed: the replica's internal gRPC address could not be pinned to the node")
        return
    if getattr(original, "gradmem_node_bound", False):
        return
    host = _node_host()

    def bind_on_node(server: Any, address: str) -> int:
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    bind_on_node.gradmem_node_bound = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = bind_on_node


@serve.deployment
@serve.ingress(app)
class GradMemService:
    def __init__(self, config: dict[str, Any]):
        from gradmem.runtime import configure_cpu, reserved_device

        self.cfg = from_dict(ServeConfig, config)
        bind_internal_grpc_to_node()
        self.metrics = ServeMetrics()
        Guard.configure(GuardSettings(key=replica_key(self.cfg), max_body_bytes=self.cfg.max_body_bytes,
                                      metrics=self.metrics))
        configure_cpu(threads=max(1, int(self.cfg.cpus_per_replica)))
        target = resolve(self.cfg.memories, self.cfg.s3_endpoint)
        self.store = MemoryStore(target.filesystem, target.path)
        uri, expect = initial_reader(self.store, self.cfg.reader)  # the store's served reader, else --reader
        device = reserved_device(self.cfg.gpus_per_replica)  # the GPU this replica reserved, never one it merely sees
        self.served = load_served(uri, self.store, self.cfg.s3_endpoint, device, expect)  # reader + index, swapped whole
        self.chunking = self._store_chunking()
        self.last_refresh = time.monotonic()
        self.cache = MemoryCache(self.store, self.cfg.cache_size, self.cfg.cache_bytes, self.metrics.cache_lookup)
        self._answer_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.lock = asyncio.Lock()  # the reader is not thread-safe: one forward at a time per replica
        self.store_lock = threading.Lock()  # index and cache, used from worker threads
        self.watch = PointerWatch(self.store, self.cfg.s3_endpoint, device, self.cfg.reader_check_interval_s,
                                  lambda: self.served.fingerprint, self._swap).start()
        logger.info("serving %d memories from %s with reader %s", len(self.index), self.cfg.memories, self.fingerprint)

    # ------------------------------------------------------------------ the served reader (pipelines/served.py)
    @property
    def reader(self) -> Reader:
        return self.served.reader

    @property
    def fingerprint(self) -> str:
        return self.served.fingerprint

    @property
    def index(self) -> MemoryIndex:
        return self.served.index

    def _swap(self, served: Served) -> None:
        """An upgrade's switch: one assignment. Requests hold the ``Served`` they started with."""
        with self.store_lock:
            self.served = served
        self.chunking = self._store_chunking()  # as the new reader reads the store's records (the same, normally)

    # ------------------------------------------------------------------ helpers (blocking: worker threads only)
    def _maybe_refresh(self, served: Served | None = None, force: bool = False) -> None:
        """Re-list the store at most once per ``refresh_interval_s``; ``force``: now (an online write must see
        every document the store holds before it decides that an id is free)."""
        served = served or self.served
        if force or time.monotonic() - self.last_refresh >= self.cfg.refresh_interval_s:
            self.last_refresh = time.monotonic()
            added = served.index.refresh()
            if added:
                logger.info("index: %d new memories (%d in all)", added, len(served.index))
                self.chunking = self._store_chunking()

    def _store_chunking(self) -> Chunking | None:
        """The chunking the store records: its manifest's (the batch job checked every part against it), else
        the one its parts of this reader record; an empty store: the reader's limit, no overlap (which online
        writes then record). None, logged, when parts without a manifest disagree: no query may assume one."""
        default = Chunking(tokens=self.reader.max_context_tokens)
        found = self.store.chunkings(default, self.fingerprint)
        if "manifest.json" in found:
            return found["manifest.json"]
        if len(set(found.values())) > 1:
            logger.error("the store's parts record several chunkings: %s", sorted({str(c) for c in found.values()}))
            return None
        return next(iter(found.values()), default)

    def _entry(self, memory_id: str | None = None, doc_id: str | None = None, chunk: int | None = None,
               served: Served | None = None) -> dict:
        """The index entry of an id in ``served``'s index (caller holds store_lock). Messages name the id, never
        the store."""
        served = served or self.served
        for attempt in range(2):
            # by doc_id: that doc_id's own row (a twin with the same text shares the memory, not the doc_id)
            entry = served.index.entry(memory_id=memory_id, doc_id=doc_id if memory_id is None else None,
                                       chunk=chunk or 0)
            if entry is not None:
                break
            if attempt == 0:
                self._maybe_refresh(served)
        what = f"memory {memory_id}" if memory_id else f"document {doc_id!r}" + (f" chunk {chunk}" if chunk else "")
        writers = served.index.written_by(doc_id, chunk or 0) if entry is None and memory_id is None else []
        if writers:  # the document exists, only not for this reader (an upgrade not yet complete for it)
            raise ApiError(409, f"{what} was written by reader {', '.join(writers)}, not by the served reader "
                           f"{served.fingerprint}; rewrite it with this reader")
        if entry is None:
            raise ApiError(404, f"unknown {what}")
        self._check_reader(entry, served)
        return entry

    def _check_reader(self, entry: dict, served: Served) -> None:
        if entry["fingerprint"] != served.fingerprint:
            raise ApiError(409, f"memory {entry['memory_id']} was written by reader {entry['fingerprint']}, not by the "
                           f"served reader {served.fingerprint}; rewrite it with this reader")

    def _document(self, doc_id: str, served: Served) -> list[dict]:
        """The index entries of every chunk of ``doc_id`` in chunk order (caller holds store_lock), checked before
        any memory is read: known, complete (a chunk not yet indexed is looked for once more), within
        ``max_chunks_per_query``, written by the served reader (``served``: this request's)."""
        for attempt in range(2):
            try:
                entries = served.index.document(doc_id)
            except IncompleteDocument as e:
                entries, incomplete = None, e
            else:
                incomplete = None
                if entries is not None:
                    break
            if attempt == 0:
                self._maybe_refresh(served)
        if incomplete is not None:
            raise ApiError(409, f"{incomplete}: it cannot be answered as a whole (ask by 'chunk', or rewrite it)")
        writers = served.index.written_by(doc_id, 0) if entries is None else []
        if writers:  # the document exists, only not for this reader (an upgrade not yet complete for it)
            raise ApiError(409, f"document {doc_id!r} was written by reader {', '.join(writers)}, not by the served "
                           f"reader {served.fingerprint}; rewrite it with this reader")
        if entries is None:
            raise ApiError(404, f"unknown document {doc_id!r}")
        if len(entries) > self.cfg.max_chunks_per_query:
            raise ApiError(413, f"document {doc_id!r} has {len(entries)} chunks: at most "
                           f"{self.cfg.max_chunks_per_query} per query; ask by 'chunk' (0..{len(entries) - 1})")
        for entry in entries:
            self._check_reader(entry, served)
        return entries

    def _load(self, memory_id: str | None = None, doc_id: str | None = None, chunk: int | None = None,
              served: Served | None = None) -> tuple[dict, torch.Tensor, dict[str, Any]]:
        with self.store_lock:
            entry = self._entry(memory_id, doc_id, chunk, served)
            tensor, meta = self.cache.get(entry)
        return entry, tensor, meta

    def _load_query(self, body: QueryRequest, served: Served) -> list[tuple[dict, torch.Tensor, dict[str, Any]]]:
        """The memories a query reads, in chunk order: by doc_id alone every chunk of the document (one for an
        unchunked one), else the one memory named."""
        if body.doc_id is None or body.chunk is not None:
            return [self._load(body.memory_id, body.doc_id, body.chunk, served)]
        with self.store_lock:
            return [(entry, *self.cache.get(entry)) for entry in self._document(body.doc_id, served)]

    def _prepare_query(self, body: QueryRequest, budget: int,
                       served: Served) -> tuple[list[dict], torch.Tensor, torch.Tensor, list[list[int]]]:
        """The blocking part of a query (index refresh, store read, tokenization), run in a worker thread so
        that the event loop keeps answering other requests meanwhile. Every check of a READ happens here, once
        (the memory's reader in ``_entry``/``_document``; finiteness, its rows and the questions' length below),
        not in the batch: one bad request must not fail a batch shared with other requests. Returns the entries,
        the memories (c, P, d) in chunk order, the rows of each the READ sees (c,) and the question token ids.
        ``served``: the reader and index this request uses from start to end (an upgrade's switch meanwhile does
        not mix readers)."""
        loaded = self._load_query(body, served)
        rows = []
        reader = served.reader
        shape = (reader.method.memory_slots(reader.num_memory, reader.max_context_tokens), reader.d_model)
        for entry, tensor, meta in loaded:
            if tuple(tensor.shape) != shape:  # a part's own (m, d) can be any: this READ needs the reader's
                raise ApiError(409, f"memory {entry['memory_id']} has shape {tuple(tensor.shape)}, not this reader's "
                               f"{shape}, and cannot be read")
            if not torch.isfinite(tensor).all():
                raise ApiError(409, f"memory {entry['memory_id']} holds NaN/inf and cannot be read")
            try:
                rows.append(int(served.reader.prefix_rows(tensor[None],
                                                          torch.tensor([meta["n_context_tokens"]]))[0]))
            except ValueError as e:
                raise ApiError(409, f"memory {entry['memory_id']} cannot be read: {e}") from e
        q_ids = tokenize(served.reader.tokenizer, body.questions)  # once: checked here, answered from these ids
        try:
            served.reader.check_questions([sum(rows)] * len(q_ids), q_ids, budget)  # every chunk's rows, composed
        except ValueError as e:
            raise ApiError(413, str(e)) from e
        tensors = torch.stack([tensor for _, tensor, _ in loaded])  # (c, P, d)
        return [entry for entry, _, _ in loaded], tensors, torch.tensor(rows), q_ids

    def _check_assumed_chunking(self, body: QueryRequest) -> None:
        """Fail closed when the request says which chunking it assumes and the store's is another (or unknown)."""
        if body.chunk_tokens is None and body.chunk_overlap is None:
            return
        have = self.chunking
        if have is None:
            raise ApiError(409, "this store records conflicting chunkings: no query can rely on one")
        if body.chunk_tokens not in (None, have.tokens) or body.chunk_overlap not in (None, have.overlap):
            assumed = ", ".join(f"{k} {v}" for k, v in (("chunk_tokens", body.chunk_tokens),
                                                        ("chunk_overlap", body.chunk_overlap)) if v is not None)
            raise ApiError(409, f"this store's documents were chunked at {have}; the request assumes {assumed}: its "
                           "chunks would be other text")

    # ------------------------------------------------------------------ batched READ
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _answer_batch(self, items: list["ReadItem"]) -> list[str]:
        """One greedy pass for the questions of many requests, each over its own document's memories, per reader
        (an upgrade's switch can leave requests of the old reader and the new in one batch)."""
        self.metrics.batch_size.observe(len(items))
        async with self.lock:
            return await asyncio.to_thread(answer_by_reader, items)

    # ------------------------------------------------------------------ routes (the key is checked by Guard)
    @app.get("/healthz", responses=errors(413, 500))
    async def healthz(self) -> dict:
        return {"status": "ok", "reader_fingerprint": self.fingerprint, "memories": len(self.index),
                "chunking": self.chunking.describe() if self.chunking is not None else None,  # None: conflicting
                "max_chunks_per_query": self.cfg.max_chunks_per_query,
                "cache": {"size": len(self.cache.items), "bytes": self.cache.bytes, "hits": self.cache.hits,
                          "misses": self.cache.misses}}

    @app.post("/v1/query", response_model=QueryResponse, responses=errors(401, 404, 409, 413, 415, 422, 500))
    async def query(self, body: QueryRequest) -> QueryResponse:
        if len(body.questions) > self.cfg.max_questions:
            raise ApiError(413, f"{len(body.questions)} questions: at most {self.cfg.max_questions} per request")
        if any(len(q) > self.cfg.max_question_chars for q in body.questions):
            raise ApiError(413, f"a question is over {self.cfg.max_question_chars} characters")
        budget = body.max_new_tokens or self.cfg.default_new_tokens
        if budget > self.cfg.max_new_tokens:
            raise ApiError(413, f"max_new_tokens {budget} is over this service's limit of {self.cfg.max_new_tokens}")
        self._check_assumed_chunking(body)
        served = self.served  # this request's reader and index, to the end
        entries, tensors, rows, q_ids = await run_in_threadpool(self._prepare_query, body, budget, served)
        answers = await asyncio.gather(*(self._answer_batch(ReadItem(tensors, rows, q, budget, served.reader))
                                         for q in q_ids))
        return QueryResponse(memory_id=entries[0]["memory_id"], doc_id=entries[0]["doc_id"],
                             reader_fingerprint=served.fingerprint, answers=list(answers),
                             memory_ids=[e["memory_id"] for e in entries], chunks=[e["chunk"] for e in entries])

    @app.post("/v1/memories", response_model=WriteResponse, responses=errors(401, 409, 413, 415, 422, 500))
    async def write(self, body: WriteRequest) -> WriteResponse:
        if len(body.text) > self.cfg.max_text_chars:
            raise ApiError(413, f"text of {len(body.text)} characters: at most {self.cfg.max_text_chars}")
        if not body.text.strip():
            raise ApiError(422, "text is empty: there is nothing to write")
        async with self.lock:
            return await asyncio.to_thread(self._write_now, body)

    def _write_now(self, body: WriteRequest) -> WriteResponse:
        served = self.served  # one reader for the whole write, whatever an upgrade's switch does meanwhile
        ids = tokenize(served.reader.tokenizer, [body.text])[0]
        if not ids:
            raise ApiError(422, "text has no tokens: there is nothing to write")
        limit = min(self.chunking.tokens if self.chunking is not None else served.reader.max_context_tokens,
                    served.reader.max_context_tokens)
        if len(ids) > limit:  # the store's chunk size, at most the reader's maximum: a memory as the store's hold
            raise ApiError(413, f"text has {len(ids)} tokens, over this store's chunk size of {limit} (the batch job, "
                           "jobs/compress.py --chunk, splits longer documents)")
        setting = served.reader.write_setting()  # the reader's own, an adaptive target included; float32
        mid = records.memory_id(served.fingerprint, setting, ids)
        with self.store_lock:
            # a fresh listing, not the rate-limited one: a batch job may have published this id a moment ago, and
            # the index keeps the first memory it sees for an id, so a stale look here would let this write win
            self._maybe_refresh(served, force=True)
            known = served.index.by_doc.get((body.doc_id, 0))
            chunks = served.index.entries[(body.doc_id, 0)]["n_chunks"] if known is not None else 1
        if chunks > 1:
            raise ApiError(409, f"document {body.doc_id!r} is already stored as {chunks} chunks; use a new doc_id")
        if known == mid:
            self.metrics.online_write(created=False)
            return WriteResponse(memory_id=mid, doc_id=body.doc_id, created=False, reader_fingerprint=served.fingerprint)
        if known is not None:
            raise ApiError(409, f"document {body.doc_id!r} is already stored with other content (memory {known}); "
                           "use a new doc_id")
        start = time.perf_counter()
        try:
            memories = served.reader.write_tokens([ids], setting)
        except NonFiniteWriteError as e:
            raise ApiError(422, f"the WRITE produced NaN/inf for this text: {e}") from e
        greedy = served.reader.reconstruct(memories, [ids]).tolist()
        seconds = time.perf_counter() - start
        table = records.to_table(memories, [body.doc_id], [ids], write_time_s=seconds, recon_greedy=greedy,
                                 chunking=self.chunking)
        part = self.store.write_part("memories", table)
        with self.store_lock:
            served.index.add({"memory_id": mid, "doc_id": body.doc_id, "chunk": 0, "n_chunks": 1, "part": part,
                              "fingerprint": served.fingerprint})
            served.index.parts.add(part)
            self.cache.put(mid, memories.tensor[0].clone(), table.drop_columns(["memory"]).to_pylist()[0])
        self.metrics.online_write(created=True, seconds=seconds, steps_used=int(memories.steps_used[0]))
        return WriteResponse(memory_id=mid, doc_id=body.doc_id, created=True, reader_fingerprint=served.fingerprint)

    @app.get("/v1/memories/{memory_id}", responses=errors(401, 404, 409, 413, 422, 500))
    async def metadata(self, memory_id: Annotated[MemoryId, Path()]) -> dict:
        entry, _, meta = await run_in_threadpool(self._load, memory_id)
        return {**meta, "reader_fingerprint": entry["fingerprint"]}


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``ServeConfig(**args)`` (also the import path of a RayService:
    ``pipelines.serve:build_app``). A key in this process's environment reaches the replicas only as a salted
    hash in the deployment's arguments: never in a runtime_env, which Ray's dashboard lists."""
    cfg = from_dict(ServeConfig, args)
    key = env_key(cfg) if not cfg.api_key_sha256 else None
    if key and cfg.api_key_file is not None:  # two keys: clients given the file's would get 401, and nothing said why
        raise ValueError(f"both ${cfg.api_key_env} and api_key_file {cfg.api_key_file} are set: give the key one way")
    if key:
        cfg = override(cfg, {"api_key_sha256": str(KeyDigest.of(key))})
    actor_options: dict[str, Any] = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    deployment = GradMemService.options(
        **cfg.scaling(),
        ray_actor_options=actor_options,
        max_ongoing_requests=max(64, 2 * cfg.max_batch_size),
    )
    return deployment.bind(asdict(cfg))
