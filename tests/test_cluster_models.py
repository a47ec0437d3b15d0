"""The distributed mode records which model analysed each job, as the embedded mode does: real PostgreSQL,
procrastinate and worker processes (tests/cluster_worker.py with ``--model-version``: a stub analysis whose
model has a name and a version, and whose result UIDs depend on the version, as the real ones do).

What must hold: the front end queues a job without a model (it loads none); the worker records the model
it ran and announces it; an input analysed by an earlier model version no longer counts as "analysed
already" once workers of a new version run (a re-run needs no ``force``), and the new job's results
supersede the old ones.
"""
from __future__ import annotations

from tests.test_cluster import _wait_all_finished, cluster  # noqa: F401 (the fixture)


def test_worker_records_its_model_and_a_new_version_reruns_and_supersedes(cluster):
    c, workers, tmp = cluster
    dest = [{"directory": str(tmp / "delivered")}]
    series = "1.2.826.0.1.7001"
    assert c.current_model() == (None, None)  # no worker has announced a model yet

    first, created = c.enqueue(series, "1.2.826.0", f"/spool/{series}", destinations=dest)
    assert created and (first.model_name, first.model_version) == (None, None)  # the front end loads no model
    # Queued, not run yet: it counts as analysed (a second event for the series must not queue another job).
    assert [j.id for j in c.analysed_now(c.store.find(series))] == [first.id]

    v1 = workers.start(1, queues="analyse-stat,analyse,deliver", extra=("--model-version", "1.0.0"))
    workers.wait_ready(v1)
    _wait_all_finished(c, 1, timeout=60)
    first = c.store.get(first.id)
    assert first.state == "done" and (first.model_name, first.model_version) == ("stub-model", "1.0.0")
    assert c.current_model("series") == ("stub-model", "1.0.0")
    assert c.current_model("image") == (None, None)  # no 2D model was loaded or announced
    assert [j.id for j in c.analysed_now(c.store.find(series))] == [first.id]  # same version: skip

    # A new model version is rolled out: workers of 2.0.0 start, the old ones stop.
    workers.stop()
    v2 = workers.start(1, queues="analyse-stat,analyse,deliver", extra=("--model-version", "2.0.0"))
    workers.wait_ready(v2)
    assert c.current_model() == ("stub-model", "2.0.0")
    assert c.analysed_now(c.store.find(series)) == []  # analysed by 1.0.0 only: a front end re-queues it

    second, created = c.enqueue(series, "1.2.826.0", f"/spool/{series}", destinations=dest)
    assert created and second.id != first.id
    _wait_all_finished(c, 2, timeout=60)
    second = c.store.get(second.id)
    assert second.state == "done" and (second.model_name, second.model_version) == ("stub-model", "2.0.0")
    old = {u["SOPInstanceUID"] for u in first.details["result_uids"].values()}
    new = {u["SOPInstanceUID"] for u in second.details["result_uids"].values()}
    assert len(old) == len(new) == 3 and not old & new
    assert set(second.details["supersedes"]) == old  # same series and model name: the old results are replaced
    assert [j.id for j in c.analysed_now(c.store.find(series))] == [second.id]
    view = {j["id"]: j for j in c.jobs()}
    assert (view[second.id]["model_name"], view[second.id]["model_version"]) == ("stub-model", "2.0.0")
