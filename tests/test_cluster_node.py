"""The node in the distributed mode, with real processes: `pacs-landmarks serve` (queue = "postgres") spools a
series and queues it in PostgreSQL; a `pacs-landmarks worker` with the real model analyses it from the spool
and a delivery worker C-STOREs the results to a dcmtk storescp archive."""
from __future__ import annotations

import subprocess

from test_node import CLI, ENV, Archive, NodeProc, phantom, series_uid_of, storescu, wait_for  # noqa: F401

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
        for w in workers:
            w.terminate()
            w.wait(30)
        archive.stop()
