"""GradMem's own metrics, in Ray's metrics system (exported through each node's Prometheus endpoint).

Why Ray's system and not a second exporter: a cluster that already scrapes Ray (``ray start
--metrics-export-port=PORT``, then ``http://NODE:PORT/metrics``; KubeRay's PodMonitor, Ray's Grafana dashboards)
gets these with nothing more to open or configure. Ray exports a metric named ``NAME`` as ``ray_NAME``, a
counter as ``ray_NAME_total``, a histogram as ``ray_NAME_bucket`` / ``_sum`` / ``_count``; ``Metric.exported``
says which. A histogram's ``_sum`` is approximate (Ray rebuilds it from bucket midpoints): totals that must be
exact are counters. The service's metrics (``ray.serve.metrics``) also carry Serve's ``application``, ``deployment``
and ``replica`` labels; the compression's (``ray.util.metrics``) come from the writer actors.

Every label has a bounded set of values (a Prometheus series per value): routes are the app's route templates
(``/v1/memories/{memory_id}``, never a raw path; ``unmatched`` for anything else), statuses are HTTP codes,
error reasons are ``gradmem.records.ERROR_REASONS``' keys. Metrics are created inside the replica or actor that
records them (Ray requires it), so this module holds their declarations and two thin recorders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from gradmem import records

SECONDS_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
COUNT_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]  # batch sizes and write steps: powers of two
UNMATCHED_ROUTE = "unmatched"
OTHER_REASON = "other"  # a reason outside ERROR_REASONS (a newer record format): never an unbounded label


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter" | "histogram"
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name a Prometheus scrape shows (histograms add _bucket, _sum and _count to it)."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"

    def create(self, module: Any) -> Any:
        """This metric as an object of ``module`` (``ray.serve.metrics`` or ``ray.util.metrics``)."""
        tags = self.tags or None
        if self.kind == "counter":
            return module.Counter(self.name, self.description, tag_keys=tags)
        return module.Histogram(self.name, self.description, boundaries=list(self.boundaries), tag_keys=tags)


# ---------------------------------------------------------------------------------------------- the service
REQUESTS = Metric("gradmem_serve_requests", "counter", "HTTP requests answered, by route template and status",
                  ("route", "status"))
LATENCY = Metric("gradmem_serve_request_seconds", "histogram", "seconds from a request's arrival at the replica to "
                 "its response, by route template and status", ("route", "status"), tuple(SECONDS_BOUNDS))
BATCH_SIZE = Metric("gradmem_serve_batch_size", "histogram", "questions answered in one batched READ (@serve.batch)",
                    boundaries=tuple(COUNT_BOUNDS))
CACHE = Metric("gradmem_serve_cache_lookups", "counter", "memory cache lookups, result = hit | miss", ("result",))
ONLINE_WRITES = Metric("gradmem_serve_memories_written", "counter", "online writes (POST /v1/memories), result = "
                       "created | existing (the same document was stored already)", ("result",))
ONLINE_WRITE_SECONDS = Metric("gradmem_serve_write_seconds", "histogram", "seconds of an online WRITE",
                              boundaries=tuple(SECONDS_BOUNDS))
ONLINE_STEPS = Metric("gradmem_serve_steps_used", "histogram", "SGD steps an online write used (adaptive writes stop "
                      "early)", boundaries=tuple(COUNT_BOUNDS))
SERVE_METRICS = (REQUESTS, LATENCY, BATCH_SIZE, CACHE, ONLINE_WRITES, ONLINE_WRITE_SECONDS, ONLINE_STEPS)

# ---------------------------------------------------------------------------------------------- compression
WRITTEN = Metric("gradmem_compress_memories_written", "counter", "memories the writer actors wrote to the store")
ERROR_ROWS = Metric("gradmem_compress_error_rows", "counter", "error rows written, by reason (records.ERROR_REASONS)",
                    ("reason",))
WRITE_SECONDS = Metric("gradmem_compress_write_seconds", "counter", "seconds the writer actors spent in WRITEs (a "
                       "counter: a Ray histogram's _sum is rebuilt from bucket midpoints, not exact)")
STEPS_USED = Metric("gradmem_compress_steps_used", "histogram", "SGD steps each written memory used (adaptive writes "
                    "stop early)", boundaries=tuple(COUNT_BOUNDS))
COMPRESS_METRICS = (WRITTEN, ERROR_ROWS, WRITE_SECONDS, STEPS_USED)


def reason_label(reason: str) -> str:
    return reason if reason in records.ERROR_REASONS else OTHER_REASON


class ServeMetrics:
    """The service's recorders; built in the replica's constructor (``ray.serve.metrics`` needs its context)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests, self.latency, self.batch_size, self.cache, self.writes, self.write_seconds, self.steps = (
            m.create(metrics) for m in SERVE_METRICS)

    def request(self, route: str, status: int | str, seconds: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(1, tags=tags)
        self.latency.observe(seconds, tags=tags)

    def cache_lookup(self, hit: bool) -> None:
        self.cache.inc(1, tags={"result": "hit" if hit else "miss"})

    def online_write(self, created: bool, seconds: float | None = None, steps_used: int | None = None) -> None:
        self.writes.inc(1, tags={"result": "created" if created else "existing"})
        if seconds is not None:
            self.write_seconds.observe(seconds)
        if steps_used is not None:
            self.steps.observe(steps_used)


class WriterMetrics:
    """The compression writer actors' recorders (``ray.util.metrics``; built in the actor's constructor)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.written, self.errors, self.seconds, self.steps = (m.create(metrics) for m in COMPRESS_METRICS)

    def call(self, written_steps: Iterable[int], error_reasons: Iterable[str], seconds: float | None) -> None:
        """One writer call: the steps each written memory used, the reason of each error row, its WRITE seconds
        (None: it wrote nothing)."""
        steps = list(written_steps)
        if steps:
            self.written.inc(len(steps))
        for s in steps:
            self.steps.observe(s)
        counts: dict[str, int] = {}
        for reason in error_reasons:
            counts[reason_label(reason)] = counts.get(reason_label(reason), 0) + 1
        for reason, n in counts.items():
            self.errors.inc(n, tags={"reason": reason})
        if seconds is not None:
            self.seconds.inc(seconds)
