"""Results that replace earlier ones: which earlier results a job's results supersede, and what a job used.

A series can change after it was analysed (a late reconstruction, a resend of missing slices): the next job
of the same series and model then makes results with new UIDs (``sr_templates/uids.py``). Its SRs name the
results they replace (Predecessor Documents Sequence), and a front end that owns the archive (the Orthanc
plugin) deletes the replaced objects. The job store is the record of what was made: each job keeps, in
``details``,

- ``result_uids``: kind -> Study/Series/SOP Class/SOP Instance UID of each result object it wrote;
- ``instances_read``: how many instances its analysis read (so a front end can tell whether more arrived).
"""
from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from pacs_landmarks.jobs.store import Job, JobStore

_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def result_uids(results: Any, kinds: dict[str, str]) -> dict[str, dict[str, str]]:
    """``details["result_uids"]`` of a job: kind -> the identifying UIDs of each result dataset
    (``kinds``: Results attribute -> kind, e.g. ``pipeline.RESULT_KINDS``)."""
    return {kind: {k: str(getattr(results, attr)[k].value) for k in _KEYS}
            for attr, kind in kinds.items() if getattr(results, attr, None) is not None}


def earlier_jobs(store: JobStore, job: Job, with_results: bool = True) -> list[Job]:
    """Jobs of the same series and model (any version) created before ``job``, newest first: the ones whose
    results ``job``'s results replace. ``with_results``: only those that recorded ``result_uids`` (jobs of
    versions before it was recorded are left out).

    An image job (``details["kind"] == "image"``, one X-ray image) replaces only earlier jobs of the same
    image (the same ``source``): the other images of its series have results of their own."""
    image = job.details.get("kind") == "image"
    return [
        j for j in reversed(store.find(job.series_instance_uid, source=job.source if image else None))
        if j.id < job.id and j.model_name == job.model_name and (j.details.get("result_uids") or not with_results)
        and (j.details.get("kind") == "image") == image
    ]


def predecessors(store: JobStore, job: Job) -> dict[str, list[Dataset]]:
    """kind -> references (UID-only datasets) of the earlier results of that kind, newest first, distinct:
    the ``predecessors`` argument of ``pipeline.process_series``."""
    out: dict[str, list[Dataset]] = {}
    seen: set[str] = set()
    for earlier in earlier_jobs(store, job):
        for kind, uids in earlier.details["result_uids"].items():
            if uids["SOPInstanceUID"] in seen:
                continue
            seen.add(uids["SOPInstanceUID"])
            ref = Dataset()
            for key in _KEYS:
                setattr(ref, key, uids[key])
            out.setdefault(kind, []).append(ref)
    return out


def instances_used(job: Job) -> int:
    """Instances the job's analysis read; before it ran, those counted when it was queued."""
    return int(job.details.get("instances_read", job.instances))
