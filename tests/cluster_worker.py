"""A distributed worker process with a stub analysis, for the queue tests (tests/test_cluster.py).

The queue semantics do not depend on the model, so this worker "analyses" by sleeping ``--seconds`` and
returning tiny placeholder result objects; it logs every run (series, pid, start, end) and the one model
load of the process to ``--log`` (JSON lines). Everything else is the real thing: procrastinate, PostgreSQL,
the shared steps, the results written and delivered by the real code.

    python tests/cluster_worker.py DSN RESULTS LOG --queues analyse-stat,analyse [--seconds 0.3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from pacs_landmarks.jobs.distributed import ClusterSettings, run_worker  # noqa: E402
from pacs_landmarks.jobs.references import DeliverByDestination  # noqa: E402


def _uid(*parts: str) -> str:
    return "2.25." + str(int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:30], 16))


class StubModel:
    """A model's identity only (``--model-version``): what the worker records on its jobs and announces."""

    name = "stub-model"

    def __init__(self, version: str):
        self.version = version


class StubResults:
    def __init__(self, series: str, version: str = ""):
        self.landmarks = []
        self.timings = {"cascade": 0.0}
        for kind in ("landmark_sr", "measurements_sr", "seg"):
            ds = Dataset()
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
            # deterministic, like the real results (whose UIDs also depend on the model version)
            ds.SOPInstanceUID = _uid(series, kind, *([version] if version else []))
            ds.SeriesInstanceUID = _uid(series, "results")
            ds.StudyInstanceUID = _uid(series, "study")
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            setattr(self, kind, ds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dsn")
    p.add_argument("results")
    p.add_argument("log")
    p.add_argument("--queues", default="analyse-stat,analyse")
    p.add_argument("--seconds", type=float, default=0.3)
    p.add_argument("--stalled-after", type=float, default=3.0)
    p.add_argument("--max-routine-wait", type=float, default=300.0)
    p.add_argument("--model-version", default=None, help="a model with a name and this version (default: none)")
    args = p.parse_args()
    log = Path(args.log)

    def write(**entry) -> None:
        with open(log, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), **entry}) + "\n")

    write(event="model_loaded", t=time.time())  # once per process, before the first job
    model = StubModel(args.model_version) if args.model_version else object()

    def process_series(datasets, model_, predecessors=None):
        series = os.path.basename(str(datasets[0]))
        start = time.time()
        write(event="run_start", series=series, t=start)
        time.sleep(args.seconds)
        write(event="run_end", series=series, start=start, t=time.time())
        return StubResults(series, args.model_version or "")

    settings = ClusterSettings(dsn=args.dsn, results_dir=args.results, heartbeat_s=0.5,
                               stalled_after_s=args.stalled_after, sweep_interval_s=0.5,
                               max_routine_wait_s=args.max_routine_wait)
    run_worker(settings, args.queues.split(","), model=model, loader=lambda job: [job.source],
               deliver=DeliverByDestination(), process_series=process_series, warm_up=False,
               on_ready=lambda: write(event="ready", t=time.time()))


if __name__ == "__main__":
    main()
