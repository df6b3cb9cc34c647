"""`/metrics` in Prometheus's text format, computed from the job store.

Any number of API processes may serve it and workers need no port of their own: job counts
are read at each scrape, and the histograms follow the events table with a cursor, so each
API process observes every stage, queue wait and token rate once (from its start, or from
the beginning of the table).

- `charter_jobs{status}` — jobs in each status now (gauge).
- `charter_stage_duration_seconds{stage}` — from a stage's `started` to its `done` event.
- `charter_queue_wait_seconds` — from submit to the first claim (the worker's start event).
- `charter_stage_tokens_per_second{stage}` — each tokens/s a stage reported (generate: the
  policy; critique, revise, label, evaluate: the judge).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from charter.service.db import JobStatus, utcnow
from charter.service.store import JobStore

# Events younger than this are left for the next scrape: on Postgres, ids are handed out at
# insert and a transaction may commit after one with a larger id.
SETTLE = timedelta(seconds=2)
MAX_EVENTS_PER_SCRAPE = 50_000
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
TOKEN_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, float("inf"))


class StoreMetrics(Collector):
    def __init__(self, store: JobStore):
        self.store = store
        self.registry = CollectorRegistry()  # no auto_describe: collect() must not run before migrations
        self.stage_seconds = Histogram(
            "charter_stage_duration_seconds",
            "Seconds from a stage's start to its end.",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "charter_queue_wait_seconds",
            "Seconds from a job's submission to its first claim by a worker.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Histogram(
            "charter_stage_tokens_per_second",
            "Generated tokens per second as each stage reported it (the judge's for critique, revise, label).",
            ["stage"],
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)
        self._cursor = 0
        self._started: dict[tuple[str, str], datetime] = {}  # (job, stage) → its started event's time
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("charter_jobs", "Jobs in each status.", labels=["status"])
        counts = self.store.count_by_status()
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status, 0))
        yield jobs

    def update(self) -> None:
        """Observe the events that arrived since the last scrape."""
        with self._lock:
            before = utcnow() - SETTLE
            seen = 0
            while seen < MAX_EVENTS_PER_SCRAPE:
                events = self.store.events_since(self._cursor, ("stage", "message"), before)
                for e in events:
                    self._observe(e.job_id, e.type, e.time, e.data)
                if not events:
                    break
                self._cursor = events[-1].id
                seen += len(events)

    def _observe(self, job_id: str, kind: str, time: datetime, data: dict) -> None:
        if kind == "message":
            if isinstance(data.get("queued_s"), int | float):
                self.queue_wait.observe(data["queued_s"])
            return
        stage, state = str(data.get("stage") or "?").split(".")[0], data.get("state")
        if state == "started":
            if len(self._started) > 10_000:  # stages that never ended (failed jobs): forget the oldest
                for key in list(self._started)[:5_000]:
                    del self._started[key]
            self._started[(job_id, stage)] = time
        elif state == "done" and (start := self._started.pop((job_id, stage), None)) is not None:
            self.stage_seconds.labels(stage).observe(max((time - start).total_seconds(), 0.0))
        elif state == "progress" and isinstance(data.get("tokens_per_s"), int | float) and data["tokens_per_s"] > 0:
            self.tokens.labels(stage).observe(data["tokens_per_s"])
