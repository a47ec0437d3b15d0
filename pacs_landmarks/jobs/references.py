"""Series data by reference and results back, for workers that share no memory with the receiver.

A distributed job carries a reference, never the images (docs/scale-out.md):

- ``job.details["wado_rs"]`` (a DICOMweb root, e.g. ``http://orthanc-a:8042/dicom-web``, then the roots in
  ``job.details["wado_rs_peers"]`` when it is unreachable: Orthancs sharing one index): the worker reads
  the whole series with ONE WADO-RS request (PS3.18 10.4, ``GET {root}/studies/{study}/series/{series}``,
  ``multipart/related; type="application/dicom"``), over ``http.client`` (measured: a 63 MB series in 0.18 s
  on loopback; python-requests is 25x slower per request);
- otherwise ``job.source`` is a folder on shared storage (the node's spool) holding the series' ``*.dcm``.

An image job (``job.details["kind"] == "image"``: one X-ray image, a cephalogram) reads that ONE instance:
WADO-RS instance retrieve (PS3.18 10.4.1.1.3, ``GET {root}/studies/{study}/series/{series}/instances/{sop}``,
``job.details["sop_instance_uid"]``), or the file ``job.source`` on the shared storage.

Results go to each of ``job.destinations``:

- ``{"stow_rs": root, "stow_rs_peers": [...]}``: STOW-RS (PS3.18 10.5, ``POST {root}/studies``), to the
  first of these roots that answers; with ``"superseded": "delete"`` (an Orthanc plugin's ``"Superseded"``),
  the earlier results this job's results replace (``job.details["supersedes"]``, jobs/steps.py) are then
  deleted from that Orthanc through its REST API;
- ``{"ae_title", "host", "port", ...}``: DICOM C-STORE (``delivery.StoreSCU``);
- ``{"directory": path}``: a copy into a folder (an export share; also what the queue tests use).

Python's standard library has no multipart/related reader or writer for binary parts, so the two small
functions below do it (RFC 2387 / RFC 2046 5.1).
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.jobs.steps import PermanentDeliveryError
from pacs_landmarks.jobs.store import Job


class UnreachableError(ConnectionError):
    """The referenced series or destination could not be reached (transient: retried)."""


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname, parts.port, timeout=timeout), parts.path.rstrip("/")


def _boundary(content_type: str) -> bytes:
    for item in content_type.split(";"):
        key, _, value = item.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"').encode()
    raise ValueError(f"no boundary in {content_type!r}")


class CutShort(ValueError):
    """A multipart body without its close delimiter: the sender stopped mid-body."""


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of the parts of a multipart message (RFC 2046 5.1.1). Raises ``CutShort`` when the close
    delimiter never came: a server killed mid-response that sent no length (it closes the connection, which
    ``http.client`` takes for the end of the body) must not pass its last part off as whole."""
    delimiter = b"--" + _boundary(content_type)
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the close delimiter
            return parts
        headers_end = chunk.find(b"\r\n\r\n")
        if headers_end < 0:
            continue
        data = chunk[headers_end + 4:]
        parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    raise CutShort(f"multipart body cut short after {len(parts)} part(s), {len(body)} bytes")


def join_multipart(items: list[bytes], media_type: str = "application/dicom") -> tuple[bytes, str]:
    """A multipart/related body of ``items`` and its Content-Type (PS3.18 8.6.1.2)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for item in items:
        out.write(f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode())
        out.write(item)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f'multipart/related; type="{media_type}"; boundary={boundary}'


def wado_rs_series(root: str, study_uid: str, series_uid: str, timeout: float = 300.0,
                   sop_instance_uid: str | None = None) -> list[Any]:
    """Every instance of a series as pydicom datasets, from one WADO-RS request (``sop_instance_uid``: only
    that instance, the instance-level retrieve)."""
    import pydicom

    conn, path = _connection(root, timeout)
    resource = f"{path}/studies/{study_uid}/series/{series_uid}"
    if sop_instance_uid:
        resource += f"/instances/{sop_instance_uid}"
    try:
        try:
            conn.request("GET", resource,
                         headers={"Accept": 'multipart/related; type="application/dicom"'})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, cut short mid-body
            raise UnreachableError(f"WADO-RS {root}: {type(exc).__name__}: {exc}") from exc
        if resp.status == 404:
            raise FileNotFoundError(f"{'instance ' + sop_instance_uid if sop_instance_uid else 'series ' + series_uid}"
                                    f" not found at {root}")
        if resp.status != 200:
            raise UnreachableError(f"WADO-RS {root}: HTTP {resp.status}")
        try:
            parts = split_multipart(body, resp.getheader("Content-Type", ""))
        except CutShort as exc:
            raise UnreachableError(f"WADO-RS {root}: {exc}") from exc
        return [pydicom.dcmread(io.BytesIO(p)) for p in parts]
    finally:
        conn.close()


SOURCE_RETRY_S = 60.0  # ClusterSettings.source_retry_s


def load_reference(job: Job, retry_s: float = SOURCE_RETRY_S) -> list[Any]:
    """The worker's ``loader``: the series the job refers to (see the module docstring).

    When no Orthanc of the reference answers (killed or restarting, mid-read or before), the read is tried
    again with back-off for ``retry_s`` seconds before the job fails: an Orthanc restart loses nothing.
    """
    root = job.details.get("wado_rs")
    image = job.details.get("kind") == "image"
    if root:
        roots = [root, *job.details.get("wado_rs_peers", [])]
        sop = job.details.get("sop_instance_uid") if image else None
        if image and not sop:
            raise ValueError("image job without details.sop_instance_uid: cannot refer to its image")
        deadline, delay = time.monotonic() + retry_s, 0.5
        while True:
            try:
                return _first_reachable(roots, lambda r: wado_rs_series(
                    r, job.study_instance_uid or "", job.series_instance_uid, sop_instance_uid=sop))
            except UnreachableError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log_event("read.retry", logging.WARNING, job=job.id, reason=str(exc)[:200], in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    if image:  # the node's spool: images/<series>/<sop>.dcm
        path = Path(job.source)
        if not path.is_file():
            raise FileNotFoundError(f"image {path.name} not found (is the shared storage mounted here?)")
        return [path]
    folder = Path(job.source)
    if not folder.is_dir():
        raise FileNotFoundError(f"spool folder {folder} not found (is the shared storage mounted here?)")
    return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("."))


def stow_rs(root: str, paths: list[Path], timeout: float = 120.0) -> None:
    """Store files with one STOW-RS request; raise unless every instance was stored."""
    body, content_type = join_multipart([Path(p).read_bytes() for p in paths])
    conn, path = _connection(root, timeout)
    try:
        conn.request("POST", f"{path}/studies", body=body,
                     headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
        resp = conn.getresponse()
        answer = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise UnreachableError(f"STOW-RS {root}: {exc}") from exc
    finally:
        conn.close()
    if resp.status in (400, 409, 415) and answer:
        raise PermanentDeliveryError(f"STOW-RS {root}: HTTP {resp.status}")
    if resp.status not in (200, 202):
        raise UnreachableError(f"STOW-RS {root}: HTTP {resp.status}")
    failed = (json.loads(answer or b"{}").get("00081198") or {}).get("Value") or []  # Failed SOP Sequence
    if failed:
        raise UnreachableError(f"STOW-RS {root}: {len(failed)} instance(s) not stored")


def delete_from_orthanc(root: str, sop_instance_uids: list[str], timeout: float = 60.0) -> int:
    """Delete instances by SOP Instance UID from the Orthanc that serves the DICOMweb ``root``, through its REST
    API at the same server (``POST /tools/lookup``, ``DELETE /instances/{id}``): DICOMweb has no delete.
    Gone already (a person, an earlier try) is fine. Returns how many were deleted; raises UnreachableError
    (the delivery is retried, storing again is a no-op) when Orthanc does not answer."""
    parts = urlsplit(root)
    conn, _ = _connection(f"{parts.scheme}://{parts.netloc}", timeout)
    deleted = 0
    try:
        for uid in sop_instance_uids:
            conn.request("POST", "/tools/lookup", body=uid.encode(), headers={"Content-Type": "text/plain"})
            resp = conn.getresponse()
            found = json.loads(resp.read() or b"[]") if resp.status == 200 else None
            if found is None:
                raise UnreachableError(f"Orthanc {root}: /tools/lookup HTTP {resp.status}")
            for item in found:
                if item.get("Type") != "Instance":
                    continue
                conn.request("DELETE", f"/instances/{item['ID']}")
                resp = conn.getresponse()
                resp.read()
                if resp.status not in (200, 404):
                    raise UnreachableError(f"Orthanc {root}: DELETE /instances HTTP {resp.status}")
                deleted += resp.status == 200
    except (OSError, http.client.HTTPException) as exc:
        raise UnreachableError(f"Orthanc {root}: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    return deleted


def _first_reachable(roots: list[str], call: Any) -> Any:
    """``call(root)`` on the first root that is reachable; the last UnreachableError if none is."""
    error: UnreachableError | None = None
    for root in dict.fromkeys(roots):
        try:
            return call(root)
        except UnreachableError as exc:
            error = exc
    assert error is not None
    raise error


class DeliverByDestination:
    """The worker's ``deliver``: STOW-RS, C-STORE or a folder copy, by the destination's keys."""

    def __init__(self, ae_title: str = "LANDMARKS"):
        self.ae_title = ae_title
        self._scu = None

    def __call__(self, job: Job, destination: dict[str, Any], paths: list[Path]) -> None:
        if destination.get("stow_rs"):
            replaced = job.details.get("supersedes") if destination.get("superseded") == "delete" else None

            def store(root: str) -> None:
                stow_rs(root, paths)
                if replaced:  # only once the new results are stored: old and new for a moment, never neither
                    n = delete_from_orthanc(root, replaced)
                    if n:
                        log_event("results.superseded", job=job.id, series=job.series_instance_uid, deleted=n)

            _first_reachable([destination["stow_rs"], *destination.get("stow_rs_peers", [])], store)
        elif destination.get("directory"):
            folder = Path(destination["directory"]) / job.series_instance_uid
            folder.mkdir(parents=True, exist_ok=True)
            for p in paths:
                tmp = folder / f".{p.name}.tmp"
                shutil.copyfile(p, tmp)
                tmp.replace(folder / p.name)
        elif destination.get("ae_title"):
            if self._scu is None:
                from pacs_landmarks.jobs.delivery import StoreSCU

                self._scu = StoreSCU(self.ae_title)
            self._scu(job, destination, paths)
        else:
            raise PermanentDeliveryError(f"destination {destination} has no stow_rs, directory or ae_title")
