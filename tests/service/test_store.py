"""JobStore against real SQLite and Postgres: claims, leases, takeovers, cancels, events, schema."""

from __future__ import annotations

import threading
import time
from datetime import UTC

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from charter.service.db import Base, Job, JobStatus, schema_status
from charter.service.store import JobFinished, JobNotFound, JobStore, LeaseLost

from .helpers import make_store, spec


def test_create_claim_heartbeat_finish(store: JobStore) -> None:
    job = store.create_job(spec("one"), name="one")
    assert job.id.startswith("job-") and len(job.id) == 16
    assert job.status == JobStatus.QUEUED and job.attempt == 0
    assert job.created_at.tzinfo == UTC
    assert store.get_job(job.id).spec == spec("one")

    claimed = store.claim("w1")
    assert claimed is not None and claimed.id == job.id
    assert (claimed.status, claimed.attempt, claimed.lease_owner) == (JobStatus.RUNNING, 1, "w1")
    assert claimed.started_at is not None and claimed.lease_expires_at is not None
    assert store.claim("w2") is None  # nothing else is queued and the lease is fresh

    before = store.get_job(job.id).lease_expires_at
    time.sleep(0.01)
    assert store.heartbeat(job.id, "w1", 1) == JobStatus.RUNNING
    assert store.get_job(job.id).lease_expires_at > before

    store.update_progress(job.id, "w1", 1, "generate", {"stage": "generate", "done": 3, "total": 8})
    assert store.get_job(job.id).progress == {"stage": "generate", "done": 3, "total": 8}

    store.finish(job.id, "w1", 1, JobStatus.SUCCEEDED, result={"report": {"pairs": 3}})
    done = store.get_job(job.id)
    assert done.status == JobStatus.SUCCEEDED and done.result == {"report": {"pairs": 3}}
    assert done.lease_owner is None and done.lease_expires_at is None and done.finished_at is not None
    with pytest.raises(LeaseLost):
        store.heartbeat(job.id, "w1", 1)  # a finished job holds no lease


def test_claims_oldest_first_and_lists_newest_first(store: JobStore) -> None:
    ids = [store.create_job(spec(f"j{i}"), name=f"j{i}").id for i in range(3)]
    assert [j.id for j in store.list_jobs(10)] == ids[::-1]
    assert [store.claim("w").id for _ in range(3)] == ids
    assert [j.id for j in store.list_jobs(10, JobStatus.RUNNING)] == ids[::-1]
    assert store.list_jobs(10, JobStatus.QUEUED) == []
    assert store.count_jobs() == 3


def test_racing_workers_never_claim_the_same_job(store: JobStore) -> None:
    ids = {store.create_job(spec(f"j{i}"), name=f"j{i}").id for i in range(24)}
    workers = 8
    barrier = threading.Barrier(workers)
    claimed: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def work(worker_id: str) -> None:
        try:
            barrier.wait()
            while (job := store.claim(worker_id)) is not None:
                claimed.append((job.id, worker_id))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(job_id for job_id, _ in claimed) == sorted(ids)  # each exactly once
    for job_id, worker_id in claimed:
        job = store.get_job(job_id)
        assert (job.lease_owner, job.attempt) == (worker_id, 1)


def test_expired_lease_is_taken_over_and_the_stale_worker_refused(db_url: str) -> None:
    store = make_store(db_url, lease_seconds=0.3)
    try:
        job = store.create_job(spec(), name="ok")
        assert store.claim("old").attempt == 1
        assert store.claim("new") is None
        time.sleep(0.4)  # "old" stopped heartbeating
        taken = store.claim("new")
        assert taken is not None and taken.id == job.id
        assert (taken.attempt, taken.lease_owner, taken.status) == (2, "new", JobStatus.RUNNING)

        with pytest.raises(LeaseLost):
            store.heartbeat(job.id, "old", 1)
        with pytest.raises(LeaseLost):
            store.update_progress(job.id, "old", 1, "train", {})
        with pytest.raises(LeaseLost):
            store.append_event(job.id, "message", {"message": "late"}, attempt=1)
        with pytest.raises(LeaseLost):
            store.finish(job.id, "old", 1, JobStatus.FAILED, error="stale")
        store.finish(job.id, "new", 2, JobStatus.SUCCEEDED, result={})
        assert store.get_job(job.id).status == JobStatus.SUCCEEDED
        messages = [e.data["message"] for e in store.events(job.id) if e.type == "message"]
        assert any("takes the job over" in m for m in messages)
    finally:
        store.engine.dispose()


def test_cancel_queued_running_finished(store: JobStore) -> None:
    queued = store.create_job(spec("q"), name="q")
    running = store.create_job(spec("r"), name="r")
    assert store.request_cancel(queued.id).status == JobStatus.CANCELLED
    assert store.get_job(queued.id).finished_at is not None

    assert store.claim("w").id == running.id  # the cancelled job is not claimable
    assert store.request_cancel(running.id).status == JobStatus.CANCELLING
    assert store.heartbeat(running.id, "w", 1) == JobStatus.CANCELLING
    store.finish(running.id, "w", 1, JobStatus.CANCELLED)

    with pytest.raises(JobFinished, match="already finished as cancelled") as err:
        store.request_cancel(running.id)
    assert err.value.status_code == 409
    with pytest.raises(JobNotFound) as missing:
        store.request_cancel("job-000000000000")
    assert missing.value.status_code == 404


def test_cancelling_job_of_a_dead_worker_becomes_cancelled(db_url: str) -> None:
    store = make_store(db_url, lease_seconds=0.2)
    try:
        job = store.create_job(spec(), name="ok")
        store.claim("dead")
        store.request_cancel(job.id)
        time.sleep(0.3)
        assert store.claim("alive") is None
        assert store.get_job(job.id).status == JobStatus.CANCELLED
    finally:
        store.engine.dispose()


def test_release_puts_the_job_back(store: JobStore) -> None:
    job = store.create_job(spec(), name="ok")
    store.claim("w1")
    released = store.release(job.id, "w1", 1)
    assert (released.status, released.lease_owner, released.lease_expires_at) == (JobStatus.QUEUED, None, None)
    again = store.claim("w2")
    assert (again.id, again.attempt) == (job.id, 2)


def test_events_in_order_after_an_id(store: JobStore) -> None:
    job = store.create_job(spec(), name="ok")
    other = store.create_job(spec("other"), name="other")
    ids = [store.append_event(job.id, "stage", {"i": i}) for i in range(5)]
    store.append_event(other.id, "message", {"message": "not mine"}, level="warning")
    assert ids == sorted(ids)
    page = store.events(job.id, after=ids[1], limit=2)
    assert [e.id for e in page] == ids[2:4] and [e.data["i"] for e in page] == [2, 3]
    assert page[0].time.tzinfo == UTC and page[0].level == "info"
    assert store.events(job.id, after=ids[-1]) == []
    with pytest.raises(JobNotFound):
        store.events("job-ffffffffffff")


def test_migrations_match_the_models(db_url: str) -> None:
    store = make_store(db_url)
    try:
        with store.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        current, heads = schema_status(store.engine)
        assert current == heads and len(heads) == 1  # at the newest migration, and one line of them
    finally:
        store.engine.dispose()


def test_status_is_stored_as_its_value(store: JobStore) -> None:
    job = store.create_job(spec(), name="ok")
    with store.engine.connect() as conn:
        raw = conn.execute(
            sa.select(sa.column("status")).select_from(sa.table("jobs")).where(sa.column("id") == job.id)
        ).scalar()
    assert raw == "queued" and Job.__table__.c.status is not None


def test_workers_take_only_jobs_whose_labels_they_all_have(store: JobStore) -> None:
    gpu = store.create_job(spec("gpu"), name="gpu", labels=["gpu"])
    both = store.create_job(spec("both"), name="both", labels=["gpu", "a100"])
    plain = store.create_job(spec("plain"), name="plain")
    assert store.get_job(both.id).labels == "a100,gpu"  # sorted, so a subset matches exactly
    assert store.claim("cpu-worker").id == plain.id
    assert store.claim("cpu-worker") is None
    assert store.claim("small-gpu", ["gpu"]).id == gpu.id
    assert store.claim("small-gpu", ["gpu"]) is None
    assert store.claim("big-gpu", ["gpu", "a100", "fast"]).id == both.id


def test_a_scope_hides_other_tenants_jobs(store: JobStore) -> None:
    mine = store.create_job(spec("a"), name="a", tenant="team-a")
    theirs = store.create_job(spec("b"), name="b", tenant="team-b")
    assert [j.id for j in store.list_jobs(10, scope="team-a")] == [mine.id]
    assert {j.id for j in store.list_jobs(10)} == {mine.id, theirs.id}  # no scope: an admin, or the worker
    assert store.get_job(mine.id, "team-a").tenant == "team-a"
    for call in (
        lambda: store.get_job(theirs.id, "team-a"),
        lambda: store.events(theirs.id, scope="team-a"),
        lambda: store.request_cancel(theirs.id, "team-a"),
    ):
        with pytest.raises(JobNotFound, match=theirs.id):
            call()
    assert store.get_job(theirs.id).status == JobStatus.QUEUED
    assert store.count_by_status() == {JobStatus.QUEUED: 2}
