"""The node in the distributed mode, with real processes: `pacs-landmarks serve` (queue = "postgres") spools a
series and queues it in PostgreSQL; a `pacs-landmarks worker` with the real model analyses it from the spool
and a delivery worker C-STOREs the results to a dcmtk storescp archive."""
from __future__ import annotations

import subprocess

import pytest

from test_node import CLI, ENV, Archive, NodeProc, phantom, series_uid_of, storescu, wait_for  # noqa: F401

from pacs_landmarks.jobs.distributed import stop_workers
from pacs_landmarks.jobs.pgstore import PgJobStore


def test_node_spools_and_enqueues_workers_analyse_and_deliver(pg_dsn, phantom, tmp_path, validate_dicom):
    archive = Archive(tmp_path / "archive").start()
    config = tmp_path / "node.toml"
    config.write_text(f'queue = "postgres"\ndsn = "{pg_dsn}"\n[cluster]\nstalled_after_s = 5.0\n')
    node = NodeProc(tmp_path / "spool", "--config", str(config), "--destination", archive.destination).start()
    logs = [open(tmp_path / f"worker-{q}.log", "w") for q in ("analyse", "deliver")]
    workers = [
        subprocess.Popen([CLI, "worker", "--config", str(config), "--storage", str(tmp_path / "spool"),
                          "--queues", queues], env=ENV, stdout=log, stderr=subprocess.STDOUT)
        for queues, log in zip(("analyse-stat,analyse", "deliver"), logs)
    ]
    try:
        storescu(node.port, sorted(phantom.glob("*.dcm")))
        series = series_uid_of(phantom)
        store = PgJobStore(pg_dsn)

        def done():
            for w in workers:
                assert w.poll() is None, (tmp_path / "worker-analyse.log").read_text()[-3000:]
            jobs = store.find(series)
            assert not [j for j in jobs if j.state == "failed"], [j.reason for j in jobs]
            return [j for j in jobs if j.state == "done"]

        job = wait_for(done, 300, "the cluster job to be done")[0]
        assert job.source.startswith(str((tmp_path / "spool").resolve()))  # a reference, not the images
        assert job.details["worker"] and job.attempts == 1
        assert len(archive.files()) == 4  # landmark SR, measurements SR, SEG, GSPS
        for f in archive.files():
            validate_dicom(f)
        # The node loaded no model: it only received and queued.
        assert not [e for e in node.events() if e.get("event") == "worker.warm_up"]
    finally:
        node.kill(15)
        stop_workers(workers)
        archive.stop()


def test_node_stat_rule_queues_by_priority_and_calling_ae(pg_dsn, phantom, tmp_path):
    """[cluster] stat_rule on the node's receivers: a series from the emergency CT's AE title, and one whose
    instances carry Requested Procedure Priority STAT, go to analyse-stat with STAT priority; the others to
    analyse. Read back from procrastinate's own table in the real PostgreSQL (no worker runs)."""
    import psycopg
    from test_node import clone_series

    from pacs_landmarks.jobs.distributed import ANALYSE, ANALYSE_STAT, ROUTINE_PRIORITY, STAT_PRIORITY

    config = tmp_path / "node.toml"
    config.write_text(f'queue = "postgres"\ndsn = "{pg_dsn}"\n[cluster]\n'
                      'stat_rule = { calling_ae_titles = ["ER-CT"], priorities = ["STAT", "HIGH"] }\n')
    node = NodeProc(tmp_path / "spool", "--config", str(config), "--idle-timeout", "0.5").start()
    try:
        cases = {
            "routine": (clone_series(phantom, tmp_path / "routine"), "SCANNER1"),
            "by_ae": (clone_series(phantom, tmp_path / "by_ae"), "ER-CT"),
            "by_priority": (clone_series(phantom, tmp_path / "prio", RequestedProcedurePriority="STAT"), "SCANNER1"),
            "low": (clone_series(phantom, tmp_path / "low", RequestedProcedurePriority="LOW"), "SCANNER1"),
        }
        for files, aet in cases.values():
            storescu(node.port, files, aet=aet)
        store = PgJobStore(pg_dsn)
        series = {name: series_uid_of(files[0].parent) for name, (files, _) in cases.items()}

        def queued():
            jobs = {name: store.find(uid) for name, uid in series.items()}
            if not all(j and j[0].state == "queued" for j in jobs.values()):
                return None
            with psycopg.connect(pg_dsn) as conn:
                tasks = {int(args["job_id"]): (queue, priority) for queue, priority, args in conn.execute(
                    "SELECT queue_name, priority, args FROM procrastinate_jobs WHERE task_name = 'analyse'")}
            # Cluster.enqueue queues the job, then defers its task: a job may be queued a moment before its task.
            return all(j[0].id in tasks for j in jobs.values()) and (jobs, tasks)

        jobs, tasks = wait_for(queued, 60, "four queued jobs and their analysis tasks")
        got = {name: tasks[j[0].id] for name, j in jobs.items()}
        assert got == {"routine": (ANALYSE, ROUTINE_PRIORITY), "by_ae": (ANALYSE_STAT, STAT_PRIORITY),
                       "by_priority": (ANALYSE_STAT, STAT_PRIORITY), "low": (ANALYSE, ROUTINE_PRIORITY)}
        assert jobs["by_ae"][0].details["stat"] and "stat" not in jobs["routine"][0].details
    finally:
        node.kill(15)


def test_stat_rule_is_checked(tmp_path):
    from pacs_landmarks.node.config import ConfigError, load
    from pacs_landmarks.plugin.config import PluginSettings

    config = tmp_path / "node.toml"
    config.write_text('queue = "postgres"\ndsn = "x"\n[cluster]\nstat_rule = { priority = ["STAT"] }\n')
    with pytest.raises(ConfigError, match="unknown key.*priority"):
        load(config).checked()
    with pytest.raises(ValueError, match="stat_rule.calling_ae_titles must be a list"):
        PluginSettings.from_orthanc_config({"PacsLandmarks": {"Cluster": {"stat_rule": {"calling_ae_titles": "ER"}}}})


def test_priority_facts_from_the_data_set_and_orthanc_tags():
    from pydicom.dataset import Dataset

    from pacs_landmarks.jobs.priority import dataset_facts, is_stat

    rule = {"priorities": ["STAT"], "station_names": ["ER1"]}
    ds, item = Dataset(), Dataset()
    item.RequestedProcedurePriority = "stat "
    ds.RequestAttributesSequence = [item]
    assert is_stat(rule, dataset_facts(ds))  # in a Request Attributes item, any case, padded
    assert not is_stat(rule, dataset_facts(Dataset()))
    assert is_stat(rule, dataset_facts({"StationName": "er1"}))  # Orthanc's simplified tags
    assert not is_stat(rule, {**dataset_facts({"StationName": "CT2"}), "calling_ae_title": "ER1"})
