"""The durable job store contract: state machine, idempotent creation, atomic claims across threads and
processes. Every test runs against both stores: SQLite (``JobStore``) and PostgreSQL (``PgJobStore``, on a
private server the test session starts)."""
from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from pacs_landmarks.jobs.store import JobStateError, JobStore, destination_key


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """``open_store()``: a new connection to this test's store (as another process would open it); the
    first call creates the store. ``open_store.where``: what a spawned process needs to open it."""
    if request.param == "sqlite":
        where = ("sqlite", str(tmp_path / "jobs.sqlite"))
    else:
        where = ("postgres", request.getfixturevalue("pg_dsn"))

    def factory():
        return _open(where)

    factory.where = where
    return factory


def _open(where):
    kind, address = where
    if kind == "sqlite":
        return JobStore(address)
    from pacs_landmarks.jobs.pgstore import PgJobStore

    return PgJobStore(address)


def _new(store: JobStore, series: str = "1.2.3", state: str = "queued"):
    job, _ = store.ensure_job(series, "1.2", f"/data/{series}", model_name="m", model_version="1", state=state,
                              destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}])
    return job


def test_ensure_job_is_idempotent_while_open(open_store):
    store = open_store()
    a, created_a = store.ensure_job("1.2.3", "1.2", "/s", state="received")
    b, created_b = store.ensure_job("1.2.3", "1.2", "/s")
    assert created_a and not created_b and a.id == b.id
    store.record_instances(a.id, 3, details={"aborted": True})
    store.record_instances(a.id, 2)
    job = store.get(a.id)
    assert job.instances == 5 and job.details == {"aborted": True}
    # Once analysis started, more instances of the series open a new job.
    store.transition(a.id, "queued")
    assert store.claim().id == a.id
    c, created_c = store.ensure_job("1.2.3", "1.2", "/s")
    assert created_c and c.id != a.id


def test_full_life_cycle_and_history(open_store):
    store = open_store()
    job = _new(store)
    assert store.claim(now=time.time()).state == "running"
    assert store.claim() is None  # nothing else to take
    store.transition(job.id, "delivering", expect="running", results={"seg": "/r/seg.dcm"}, timings={"cascade": 1.5})
    key = destination_key(job.destinations[0])
    assert key == "PACS@127.0.0.1:104"
    # Destination down: back off, unowned, not claimable before the back-off ends.
    store.transition(job.id, "delivering", reason="refused", delivery={key: "connection refused"},
                     next_attempt_at=time.time() + 60, delivery_attempt=True)
    assert store.claim() is None
    assert store.claim(now=time.time() + 61).id == job.id
    done = store.transition(job.id, "done", delivery={key: "success"}, timings={"delivery": 0.1})
    assert done.finished and done.delivery == {key: "success"} and done.delivery_attempts == 1
    assert done.timings == {"cascade": 1.5, "delivery": 0.1} and done.results == {"seg": "/r/seg.dcm"}
    assert [s for _, s, _ in store.events(job.id)] == ["queued", "running", "delivering", "delivering", "done"]
    with pytest.raises(JobStateError):
        store.transition(job.id, "running")
    assert store.list(["done"])[0].to_json()["state"] == "done"


def test_retry_and_resume(open_store):
    store = open_store()
    a, b, c = _new(store, "1.1"), _new(store, "1.2"), _new(store, "1.3")
    for _ in range(3):
        store.claim()
    store.transition(a.id, "failed", reason="bad series")
    store.transition(b.id, "delivering", results={}, next_attempt_at=time.time() + 600)
    # c is left "running" by a crashed worker.
    with pytest.raises(JobStateError):
        store.retry(c.id)
    assert store.retry(a.id).state == "queued" and store.get(a.id).reason is None
    assert store.retry(b.id).next_attempt_at == 0
    unfinished = open_store().resume()  # as a restarted process would
    assert {j.id: j.state for j in unfinished} == {a.id: "queued", b.id: "delivering", c.id: "queued"}
    assert store.get(c.id).attempts == 1 and store.events(c.id)[-1][2] == "resumed after restart"
    assert {store.claim().id for _ in range(3)} == {a.id, b.id, c.id}


def test_claims_are_exclusive_across_threads(open_store):
    store = open_store()
    ids = [_new(store, f"1.{n}").id for n in range(40)]
    got: list[int] = []
    lock = threading.Lock()

    def take():
        while (job := store.claim()) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == ids


def _claim_all(where, queue):
    store = _open(where)
    while (job := store.claim()) is not None:
        queue.put(job.id)
    queue.put(None)


def test_claims_are_exclusive_across_processes(open_store):
    store = open_store()
    ids = [_new(store, f"1.{n}").id for n in range(30)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(open_store.where, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got, ended = [], 0
    while ended < len(procs):
        item = queue.get(timeout=60)
        if item is None:
            ended += 1
        else:
            got.append(item)
    for p in procs:
        p.join(timeout=30)
    assert sorted(got) == ids


def test_claim_of_one_chosen_job(open_store):
    """The distributed mode's tasks claim the job the queue engine chose, not the oldest one."""
    store = open_store()
    a, b = _new(store, "2.1"), _new(store, "2.2")
    assert store.claim("w1", job_id=b.id).id == b.id
    assert store.claim("w2", job_id=b.id) is None  # already running
    job = store.get(b.id)
    assert job.state == "running" and job.owner == "w1" and job.attempts == 1
    # A stalled worker's job goes back to queued (the sweeper) and is claimed again: attempts count on.
    store.transition(b.id, "queued", expect="running", reason="worker w1 stalled")
    assert store.claim("w2", job_id=b.id).attempts == 2
    assert store.events(b.id)[-2][1:] == ("queued", "worker w1 stalled")
    assert store.claim("w3").id == a.id


def test_concurrent_ensure_job_makes_one_job(open_store):
    """Receivers on several hosts may see the same series at once: one open job comes out."""
    store = open_store()
    out: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def ensure():
        s = open_store()
        for _ in range(5):
            job, created = s.ensure_job("3.1", "3", "/s", state="queued")
            with lock:
                out.append((job.id, created))

    threads = [threading.Thread(target=ensure) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({i for i, _ in out}) == 1 and sum(c for _, c in out) == 1
    assert len(store.find("3.1")) == 1


def test_unknown_job_and_bad_transitions(open_store):
    store = open_store()
    with pytest.raises(JobStateError):
        store.get(999)
    with pytest.raises(JobStateError):
        store.transition(999, "queued")
    job = _new(store, "4.1", state="received")
    with pytest.raises(JobStateError):
        store.transition(job.id, "delivering")
    with pytest.raises(JobStateError):
        store.transition(job.id, "queued", expect="running")
    with pytest.raises(JobStateError):
        store.ensure_job("4.2", None, "/s", state="running")
    assert store.get(job.id).state == "received" and [s for _, s, _ in store.events(job.id)] == ["received"]
