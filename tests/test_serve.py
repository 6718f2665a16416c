"""The query service over real HTTP on a real local Ray Serve, with memories on a real S3-compatible server."""

from __future__ import annotations

import time

import pytest
import requests

from conftest import _port, make_reader
from gradmem import Reader, records
from gradmem.store import MemoryStore
from gradmem.tasks.kv import KVTask, exact_match
from pipelines.compress import CompressConfig, compress
from pipelines.serve import build_app

KEY_ENV = "GRADMEM_TEST_API_KEY"


@pytest.fixture(scope="module")
def service(ray_cluster, s3, kv_reader_dir, tmp_path_factory):
    """40 key-value documents compressed to S3, served at BASE (open) and BASE/secured (API key)."""
    from ray import serve

    fs = s3.filesystem()
    prefix, out = f"gradmem-test/serve-corpus-{time.time_ns()}", f"gradmem-test/serve-memories-{time.time_ns()}"
    exs = KVTask(1).examples(40, seed=[21, 3])
    with fs.open_output_stream(f"{prefix}/docs.jsonl") as f:
        f.write("\n".join(f'{{"id": "doc-{i}", "text": "{e.context}"}}' for i, e in enumerate(exs)).encode())
    manifest = compress(CompressConfig(reader=str(kv_reader_dir), input=f"s3://{prefix}", output=f"s3://{out}",
                                       s3_endpoint=s3.endpoint, greedy_check=False))
    assert manifest["complete"] and manifest["memories"] == 40

    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"reader": str(kv_reader_dir), "memories": f"s3://{out}", "s3_endpoint": s3.endpoint,
            "refresh_interval_s": 0.0, "max_questions": 8, "max_text_chars": 2000, "api_key_env": KEY_ENV}
    serve.run(build_app(args), name="open", route_prefix="/")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, "s3cret")  # the deploying process holds the key; build_app hands it to the replicas
        serve.run(build_app(args), name="secured", route_prefix="/secured")
    yield {"base": f"http://127.0.0.1:{port}", "store": MemoryStore(fs, out), "exs": exs, "fs": fs}
    serve.shutdown()


def _query(base: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{base}/v1/query", json=body, timeout=60, **kw)


def test_answers_over_http_match_in_process_answers(service, kv_reader_dir):
    reader = Reader.from_pretrained(kv_reader_dir)
    ids, memories = records.from_table(service["store"].read("memories"), reader.fingerprint)
    exs = {f"doc-{i}": e for i, e in enumerate(service["exs"])}
    questions = [exs[d].query for d in ids]
    local = reader.answer(memories, questions, max_new_tokens=4)
    remote = []
    for doc_id, q in zip(ids, questions):
        r = _query(service["base"], {"doc_id": doc_id, "questions": [q, q], "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["doc_id"] == doc_id and body["reader_fingerprint"] == reader.fingerprint
        assert body["answers"][0] == body["answers"][1]
        remote.append(body["answers"][0])
    assert remote == local
    em = sum(exact_match(a, exs[d].target) for a, d in zip(remote, ids)) / len(ids)
    assert em > 0.8, em
    health = requests.get(f"{service['base']}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["memories"] >= 40 and health["cache"]["hits"] > 0


def test_every_error_has_its_status_and_a_message(service):
    base = service["base"]
    cases = [
        ({"doc_id": "nope", "questions": ["?!ab:"]}, 404),
        ({"memory_id": "0" * 32, "questions": ["?!ab:"]}, 404),
        ({"memory_id": "../../etc/passwd", "questions": ["?!ab:"]}, 422),
        ({"doc_id": "doc-1", "memory_id": "0" * 32, "questions": ["?!ab:"]}, 422),
        ({"doc_id": "doc-1"}, 422),
        ({"doc_id": "doc-1", "questions": "?!ab:"}, 422),
        ({"doc_id": "doc-1", "questions": ["?!ab:"] * 9}, 413),
        ({"doc_id": "doc-1", "questions": ["?!ab:"], "max_new_tokens": 10_000}, 413),
        ({"doc_id": "doc-1", "questions": ["?" * 300]}, 413),  # over the reader's positions
    ]
    for body, status in cases:
        r = _query(base, body)
        assert r.status_code == status, (body, r.status_code, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["status"] == status
    r = requests.post(f"{base}/v1/query", data=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "malformed" in r.json()["error"]
    r = requests.post(f"{base}/v1/memories", json={"doc_id": "big", "text": "!ab:cd!|" * 300}, timeout=30)
    assert r.status_code == 413, r.text
    r = requests.post(f"{base}/v1/memories", json={"doc_id": "over", "text": "!ab:cd!|" * 20}, timeout=30)
    assert r.status_code == 413 and "tokens" in r.json()["error"]  # 160 tokens > 100
    r = requests.post(f"{base}/v1/memories", json={"doc_id": "blank", "text": "  "}, timeout=30)
    assert r.status_code == 422
    assert requests.get(f"{base}/v1/memories/not-an-id", timeout=30).status_code == 422
    assert requests.get(f"{base}/v1/memories/{'a' * 32}", timeout=30).status_code == 404


def test_a_memory_of_another_reader_is_refused(service):
    other = make_reader("llama", seed=5)
    text = service["exs"][0].context
    table = records.to_table(other.write([text]), ["foreign"], other.encode_contexts([text]))
    service["store"].write_part("memories", table)  # e.g. a store shared by mistake
    r = _query(service["base"], {"doc_id": "foreign", "questions": ["?!ab:"]})
    assert r.status_code == 409 and other.fingerprint in r.json()["error"], r.text


def test_online_write_then_query_then_metadata(service):
    base, ex = service["base"], KVTask(1).examples(1, seed=[99, 1])[0]
    r = requests.post(f"{base}/v1/memories", json={"doc_id": "online-1", "text": ex.context}, timeout=60)
    assert r.status_code == 200 and r.json()["created"], r.text
    mid = r.json()["memory_id"]
    again = requests.post(f"{base}/v1/memories", json={"doc_id": "online-1", "text": ex.context}, timeout=60).json()
    assert again == {**r.json(), "created": False}
    clash = requests.post(f"{base}/v1/memories", json={"doc_id": "online-1", "text": "!zz:zz!|"}, timeout=60)
    assert clash.status_code == 409
    answer = _query(base, {"memory_id": mid, "questions": [ex.query], "max_new_tokens": 4}).json()
    assert answer["doc_id"] == "online-1" and exact_match(answer["answers"][0], ex.target), answer
    meta = requests.get(f"{base}/v1/memories/{mid}", timeout=30).json()
    assert meta["doc_id"] == "online-1" and meta["n_context_tokens"] == len(ex.context) and "memory" not in meta
    # stored as the batch job stores it: same record, same place
    stored = service["store"].read("memories", ["memory_id", "doc_id"])
    assert ("online-1", mid) in set(zip(stored.column("doc_id").to_pylist(), stored.column("memory_id").to_pylist()))


def test_api_key_is_enforced_when_set(service):
    base = f"{service['base']}/secured"
    body = {"doc_id": "doc-0", "questions": ["?!ab:"], "max_new_tokens": 4}
    assert _query(base, body).status_code == 401
    assert _query(base, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _query(base, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert requests.get(f"{base}/healthz", timeout=10).status_code == 200  # probes need no key
    assert _query(service["base"], body).status_code == 200  # the open app asks for none


def test_openapi_document_lists_the_api(service):
    spec = requests.get(f"{service['base']}/openapi.json", timeout=30).json()
    assert {"/v1/query", "/v1/memories", "/v1/memories/{memory_id}", "/healthz"} <= set(spec["paths"])
    assert requests.get(f"{service['base']}/docs", timeout=30).status_code == 200


def test_twins_answer_with_their_own_doc_id_and_a_garbage_part_breaks_nothing(service):
    """Issue 14 items 2 and 5: an online write of a batch document's text under another doc_id keeps both
    answerable, each naming its own doc_id; a garbage part in the store is skipped, not a 500."""
    base, ex, store = service["base"], service["exs"][5], service["store"]
    with service["fs"].open_output_stream(f"{store.root}/memories/part-garbage.parquet") as f:
        f.write(b"not parquet at all")
    r = requests.post(f"{base}/v1/memories", json={"doc_id": "twin-of-doc-5", "text": ex.context}, timeout=60)
    assert r.status_code == 200 and r.json()["created"], r.text
    for doc_id in ("doc-5", "twin-of-doc-5"):
        answer = _query(base, {"doc_id": doc_id, "questions": [ex.query], "max_new_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert answer.json()["doc_id"] == doc_id and exact_match(answer.json()["answers"][0], ex.target)
    assert answer.json()["memory_id"] == r.json()["memory_id"]  # one memory, two documents
    assert _query(base, {"doc_id": "never-written", "questions": ["?!ab:"]}).status_code == 404
    stored = store.read("memories", ["doc_id"]).column("doc_id").to_pylist()
    assert {"doc-5", "twin-of-doc-5"} <= set(stored)
