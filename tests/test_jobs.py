"""The durable job store: state machine, idempotent creation, atomic claims across threads and processes."""
from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from pacs_landmarks.jobs.store import JobStateError, JobStore, destination_key


def _new(store: JobStore, series: str = "1.2.3", state: str = "queued"):
    job, _ = store.ensure_job(series, "1.2", f"/data/{series}", model_name="m", model_version="1", state=state,
                              destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}])
    return job


def test_ensure_job_is_idempotent_while_open(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
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


def test_full_life_cycle_and_history(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
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


def test_retry_and_resume(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
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
    unfinished = JobStore(tmp_path / "jobs.sqlite").resume()  # as a restarted process would
    assert {j.id: j.state for j in unfinished} == {a.id: "queued", b.id: "delivering", c.id: "queued"}
    assert store.get(c.id).attempts == 1 and store.events(c.id)[-1][2] == "resumed after restart"
    assert {store.claim().id for _ in range(3)} == {a.id, b.id, c.id}


def test_claims_are_exclusive_across_threads(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
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


def _claim_all(path, queue):
    store = JobStore(path)
    while (job := store.claim()) is not None:
        queue.put(job.id)
    queue.put(None)


def test_claims_are_exclusive_across_processes(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    ids = [_new(store, f"1.{n}").id for n in range(30)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(path, queue)) for _ in range(2)]
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
