"""GradMem's metric declarations, in-process: bounded labels and the README's table (the scrapes over HTTP are in
tests/test_serve.py and tests/test_compress.py)."""

from __future__ import annotations

import re
from pathlib import Path

from pipelines import metrics
from pipelines.serve import route_template

ROOT = Path(__file__).resolve().parents[1]


def _scope(method: str, path: str, root_path: str = "") -> dict:
    return {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": [],
            "query_string": b""}


def test_routes_are_labelled_by_template_never_by_raw_path():
    assert route_template(_scope("GET", "/v1/memories/" + "a" * 32)) == "/v1/memories/{memory_id}"
    assert route_template(_scope("POST", "/v1/query")) == "/v1/query"
    assert route_template(_scope("POST", "/healthz")) == "/healthz"  # a wrong method (405) keeps its route
    assert route_template(_scope("GET", "/secured/v1/query", root_path="/secured")) == "/v1/query"
    for path in ("/etc/passwd", "/v1/query/extra", "/" + "x" * 5000):
        assert route_template(_scope("GET", path)) == metrics.UNMATCHED_ROUTE


def test_error_reasons_are_a_bounded_label():
    assert metrics.reason_label("too_long") == "too_long"
    assert metrics.reason_label("something new") == metrics.OTHER_REASON


def test_the_readme_table_names_every_metric_and_no_other():
    text = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(ray_gradmem_\w+)` \| (counter|histogram) \|", text, flags=re.M))
    declared = {(m.exported, m.kind) for m in metrics.SERVE_METRICS + metrics.COMPRESS_METRICS}
    assert listed == declared
