"""The node's DICOM listener: Verification + Storage SCP (PS3.4 Annex A and B) over pynetdicom.

- Every storage SOP class is accepted (``AllStoragePresentationContexts``) with the transfer syntaxes in
  ``TRANSFER_SYNTAXES``. CT Image Storage and Enhanced CT Image Storage series start a job when complete;
  with a 2D model loaded (``image_defaults``), each single-frame X-ray image (DX For Presentation / For
  Processing, CR, Secondary Capture that is not a screen capture of another modality:
  ``jobs.steps.starts_image_job``) starts its own job as soon as it is stored (``images/<SeriesUID>/<SOP>.dcm``;
  one image is the whole input, no completion wait). Any other object is
  still stored (under ``other/``, nothing a PACS sends is dropped) and logged once per series as ignored.
- An instance is written as received (the encoded dataset, PS3.10 file meta added) and is durable, data and
  name, before Success (0x0000) is answered (``receive.DurableWriter``: temporary file, rename, fdatasync
  beside a group-committed folder fsync). Paths are built from UIDs that match the
  PS3.5 9.1 character repertoire only (digits and dots): anything else is refused, so nothing is written
  outside the storage directory.
- Refusals (PS3.4 B.2.3): 0xA700 out of resources (too large, disk error), 0xA900 data set does not match the
  SOP class (UIDs differ from the request, UIDs missing), 0xC000 cannot understand (undecodable, truncated,
  bad UID).
- A series is complete when every association that sent it has closed (released or aborted) and no instance
  of it arrived for ``idle_timeout`` seconds; or at once when the expected count is known and reached
  (Images in Acquisition (0020,1002); an Enhanced CT instance with Number of Frames > 1 is a whole volume).
- TCP_NODELAY is set on every accepted socket (before TLS wraps it); each association waits on its socket
  and queues instead of polling (``receive.install_wakeups``).
"""
from __future__ import annotations

import io
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dsutils import decode
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacs_landmarks.dicom.series import CT_CLASSES
from pacs_landmarks.node.config import NodeConfig
from pacs_landmarks.node.receive import (
    DurableWriter, FileHeaders, cache_uid_validation, copyable_contexts, install_wakeups, quiet_pynetdicom,
)
from pacs_landmarks.jobs.priority import dataset_facts, is_stat
from pacs_landmarks.jobs.steps import starts_image_job
from pacs_landmarks.jobs.store import JobStore
from pacs_landmarks.jobs.logs import log_event

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
]
JOB_SOP_CLASSES = CT_CLASSES  # the CT image classes the loader assembles into volumes

# PS3.5 9.1: digits and dots, at most 64 characters. Leading zeros (invalid but seen in the wild) are
# tolerated: what matters here is that the UID is safe as a file name.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
PIXEL_DATA = 0x7FE00010
DEFER_BYTES = 64 * 1024  # values this large are not read on receipt (native Pixel Data): written as they came


class Refused(Exception):
    """An instance that is not stored; ``status`` is the C-STORE status answered."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def safe_uid(value: object, what: str) -> str:
    uid = str(value or "").strip().rstrip("\x00")
    if len(uid) > 64 or not _UID.match(uid):
        raise Refused(CANNOT_UNDERSTAND, f"{what} is not a valid UID")
    return uid


def check_pixel_data(ds: Dataset, transfer_syntax: UID | None = None, stream_length: int | None = None) -> None:
    """Refuse an image whose Pixel Data is missing or shorter than its header says (a truncated transfer).

    ``transfer_syntax``: the data set's (default: its file meta's). ``stream_length``: the length of the encoded
    data set it was read from; with it, native Pixel Data whose read was deferred is checked by its declared
    length against the bytes that arrived, without reading it.
    """
    if "PixelData" not in ds:
        raise Refused(CANNOT_UNDERSTAND, "image without Pixel Data")
    transfer_syntax = transfer_syntax or ds.file_meta.TransferSyntaxUID
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if stream_length is not None and getattr(raw, "value", b"") is None and not transfer_syntax.is_encapsulated:
        if raw.value_tell + raw.length > stream_length:
            raise Refused(CANNOT_UNDERSTAND, f"Pixel Data truncated: {stream_length - raw.value_tell} of "
                                             f"{raw.length} bytes")
        data_length = raw.length
    else:
        data = ds.PixelData
        data_length = len(data)
    if transfer_syntax.is_encapsulated:
        # PS3.5 A.4: items (FFFE,E000) with explicit lengths; a cut-off transfer leaves an item short.
        offset = 0
        while offset + 8 <= len(data):
            group, elem, length = int.from_bytes(data[offset:offset + 2], "little"), int.from_bytes(
                data[offset + 2:offset + 4], "little"), int.from_bytes(data[offset + 4:offset + 8], "little")
            if (group, elem) != (0xFFFE, 0xE000):
                raise Refused(CANNOT_UNDERSTAND, "encapsulated Pixel Data is malformed")
            offset += 8 + length
        if offset != len(data):
            raise Refused(CANNOT_UNDERSTAND, "encapsulated Pixel Data is truncated")
        return
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
        expected = expected * int(ds.BitsAllocated) // 8
    except (AttributeError, TypeError, ValueError):
        raise Refused(CANNOT_UNDERSTAND, "image pixel description (Rows, Columns, Bits Allocated) missing") from None
    if data_length < expected:
        raise Refused(CANNOT_UNDERSTAND, f"Pixel Data truncated: {data_length} of {expected} bytes")


def read_received(raw: bytes, transfer_syntax: UID) -> Dataset:
    """The data set of a C-STORE request (no file meta), values over ``DEFER_BYTES`` left unread when the
    transfer syntax is native (``check_pixel_data`` checks their declared length against ``len(raw)``)."""
    if transfer_syntax.is_deflated:  # PS3.5 A.5: inflate first; pynetdicom's own decoder does that
        return decode(io.BytesIO(raw), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian, True)
    defer = None if transfer_syntax.is_encapsulated else DEFER_BYTES
    return read_dataset(io.BytesIO(raw), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                        defer_size=defer)


def series_files(directory: str | Path) -> list[Path]:
    """The stored instances of one series directory (temporary files excluded), sorted."""
    return sorted(p for p in Path(directory).glob("*.dcm") if not p.name.startswith("."))


@dataclass
class _OpenSeries:
    job_id: int
    series_uid: str
    count: int = 0
    last_arrival: float = field(default_factory=time.monotonic)
    associations: set[int] = field(default_factory=set)  # open ones that sent instances of the series
    seen: set[int] = field(default_factory=set)  # every one that did
    expected: int | None = None
    aborted: bool = False


class SeriesTracker:
    """Decides when a series is complete and queues its job (see the module docstring)."""

    def __init__(self, store: JobStore, idle_timeout: float, on_queued: Callable[[int], None] = lambda j: None):
        self.store = store
        self.idle_timeout = idle_timeout
        self.on_queued = on_queued
        self._open: dict[str, _OpenSeries] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="series-completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def open_job(self, series_uid: str) -> int | None:
        with self._lock:
            s = self._open.get(series_uid)
            return s.job_id if s else None

    def adopt(self, job_id: int, series_uid: str, count: int) -> None:
        """Track a job left ``received`` by an earlier run: complete after the idle timeout from now."""
        with self._lock:
            self._open[series_uid] = _OpenSeries(job_id, series_uid, count=count)

    def arrived(self, job_id: int, series_uid: str, assoc: int, expected: int | None) -> None:
        with self._lock:
            s = self._open.get(series_uid)
            if s is None or s.job_id != job_id:
                s = self._open[series_uid] = _OpenSeries(job_id, series_uid)
            s.count += 1
            s.last_arrival = time.monotonic()
            s.associations.add(assoc)
            s.seen.add(assoc)
            if expected:
                s.expected = expected
            done = s.expected is not None and s.count >= s.expected
        if done:
            self._complete(series_uid, "expected count reached")

    def closed(self, assoc: int, aborted: bool) -> None:
        """An association ended: its series complete after the idle timeout (or now, if idle already)."""
        with self._lock:
            for s in self._open.values():
                if assoc in s.seen:  # EVT_ABORTED may come after the connection closed
                    s.associations.discard(assoc)
                    s.aborted = s.aborted or aborted

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._lock:
                ready = [
                    uid for uid, s in self._open.items()
                    if not s.associations and now - s.last_arrival >= self.idle_timeout
                ]
            for uid in ready:
                self._complete(uid, "idle timeout")

    def _complete(self, series_uid: str, why: str) -> None:
        with self._lock:
            s = self._open.pop(series_uid, None)
        if s is None:
            return
        wait = time.monotonic() - s.last_arrival
        # Count what is on disk, not arrivals: a resent instance overwrites its file and must count once.
        job = self.store.get(s.job_id)
        s.count = len(series_files(job.source))
        self.store.record_instances(s.job_id, s.count - job.instances,
                                    details={"aborted": s.aborted} if s.aborted else None)
        try:
            self.store.transition(s.job_id, "queued", expect="received", timings={"completion_wait": wait})
        except Exception:  # retried or failed by an operator meanwhile: nothing to queue
            logging.getLogger(__name__).exception("could not queue job %s", s.job_id)
            return
        log_event("series.complete", job=s.job_id, series=series_uid, instances=s.count, why=why,
                  aborted=s.aborted or None, wait_s=wait)
        log_event("job.queued", job=s.job_id, series=series_uid)
        self.on_queued(s.job_id)


class _Handler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        install_wakeups(assoc)  # wait on the socket and queues instead of pynetdicom's 1 ms polls (receive.py)
        return assoc


class _NoDelayServer(ThreadedAssociationServer):
    """Sets TCP_NODELAY on each accepted socket (before any TLS wrap): DIMSE is request/response, and
    Nagle's algorithm would hold back the last small segment of every PDU."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("request_handler", _Handler)
        super().__init__(*args, **kwargs)

    def get_request(self):  # type: ignore[override]
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address


def server_ssl_context(cfg: NodeConfig) -> ssl.SSLContext | None:
    """DICOM TLS (PS3.15 B.1) for incoming associations, or None."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cfg.tls_ca)
    return ctx


class StorageSCP:
    """The listener. ``job_defaults`` (model name/version, destinations) go into every new job."""

    def __init__(self, cfg: NodeConfig, store: JobStore, tracker: SeriesTracker, job_defaults: dict,
                 image_defaults: dict | None = None):
        self.cfg = cfg
        self.image_defaults = image_defaults  # job defaults of X-ray image jobs; None: images are not analysed
        self.store = store
        self.tracker = tracker
        self.job_defaults = job_defaults
        self.root = cfg.storage_path.resolve()
        self.max_bytes = int(cfg.max_instance_mb * 1024 * 1024)
        self._allow = {a.ae_title: a.addresses for a in cfg.allow}
        self._assoc_counts: dict[int, int] = {}
        self._ignored_logged: set[tuple[int, str]] = set()
        self._series_lock = threading.Lock()
        # The distributed mode's STAT rule (jobs/priority.py): a matching instance marks its series' job STAT.
        self.stat_rule = (cfg.cluster.get("stat_rule") or {}) if cfg.queue == "postgres" else {}
        self._stat_jobs: set[int] = set()
        self.writer = DurableWriter()
        self.headers = FileHeaders()
        self.server: ThreadedAssociationServer | None = None

        quiet_pynetdicom()  # no per-PDU log formatting for a logger kept at WARNING (receive.py)
        cache_uid_validation()  # A-ASSOCIATE-RQs repeat the same UIDs (receive.py)
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        # Larger PDUs than pynetdicom's 16 KB default: ~30x fewer PDUs per CT slice through its Python DUL
        # (measured 106 -> 175 instances/s without fsync); still bounded, as a PDU is held in memory.
        ae.maximum_pdu_size = 4 * 1024 * 1024
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae = ae

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, lambda e: self._on_end(e, "released")),
            (evt.EVT_ABORTED, lambda e: self._on_end(e, "aborted")),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        server = self.ae.make_server(
            (self.cfg.bind, int(self.cfg.port)), ssl_context=server_ssl_context(self.cfg),
            evt_handlers=handlers, server_class=_NoDelayServer,
            contexts=copyable_contexts(self.ae.supported_contexts),  # copied per association: receive.py
        )
        self.ae._servers.append(server)  # as AE.start_server does, so server.shutdown() can deregister it
        thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
        thread.start()
        self.server = server
        host, port = server.server_address[:2]
        return host, port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- association events --------------------------------------------------------------------------------
    def _on_requested(self, event) -> None:
        rq = event.assoc.requestor
        calling = str(rq.primitive.calling_ae_title).strip()
        address = rq.address
        if self._allow:
            allowed = self._allow.get(calling)
            if allowed is None or (allowed and address not in allowed):
                why = "calling AE title not recognised" if allowed is None else "address not allowed for AE"
                log_event("association.rejected", logging.WARNING, calling_ae=calling, address=address, reason=why)
                # PS3.8 9.3.4: rejected-permanent, service-user, calling-AE-title-not-recognized
                event.assoc.acse.send_reject(0x01, 0x01, 0x03)
                event.assoc.kill()  # as pynetdicom's own rejections do: lets the DUL send the A-ASSOCIATE-RJ

    def _on_established(self, event) -> None:
        self._assoc_counts[id(event.assoc)] = 0
        rq = event.assoc.requestor
        log_event("association.accepted", calling_ae=rq.ae_title, address=f"{rq.address}:{rq.port}",
                  tls=bool(self.cfg.tls_cert) or None)

    def _on_end(self, event, how: str) -> None:
        rq = event.assoc.requestor
        log_event(f"association.{how}", calling_ae=rq.ae_title, instances=self._assoc_counts.get(id(event.assoc), 0))
        if how == "aborted":
            self.tracker.closed(id(event.assoc), aborted=True)

    def _on_conn_close(self, event) -> None:
        key = id(event.assoc)
        if self._assoc_counts.pop(key, None) is not None:
            self.tracker.closed(key, aborted=bool(event.assoc.is_aborted))

    # -- C-STORE -------------------------------------------------------------------------------------------
    def _on_store(self, event) -> int:
        assoc = id(event.assoc)
        try:
            path, ds, for_job = self._store(event)
        except Refused as exc:
            log_event("instance.refused", logging.WARNING, calling_ae=event.assoc.requestor.ae_title,
                      status=f"0x{exc.status:04X}", reason=str(exc))
            return exc.status
        self._assoc_counts[assoc] = self._assoc_counts.get(assoc, 0) + 1
        series_uid = str(ds.SeriesInstanceUID)
        if for_job == "image":
            self._queue_image(ds, path, event.assoc.requestor.ae_title)
            return SUCCESS
        if not for_job:
            if (assoc, series_uid) not in self._ignored_logged:
                self._ignored_logged.add((assoc, series_uid))
                log_event("series.ignored", series=series_uid, sop_class=str(ds.SOPClassUID),
                          modality=str(ds.get("Modality", "")), reason="not CT / Enhanced CT Image Storage")
            return SUCCESS
        self._track(event, ds, path)
        return SUCCESS

    def _store(self, event) -> tuple[Path, Dataset, str | None]:
        req = event.request
        size = req.DataSet.getbuffer().nbytes if req.DataSet is not None else 0
        if size > self.max_bytes:
            raise Refused(OUT_OF_RESOURCES, f"instance of {size} bytes exceeds max_instance_mb")
        sop_uid = safe_uid(req.AffectedSOPInstanceUID, "Affected SOP Instance UID")
        sop_class = str(req.AffectedSOPClassUID)
        # The data set as it arrived (PS3.7 9.3.1.1, in the context's transfer syntax): parsed once, without
        # file meta and without reading native Pixel Data, and written after a file meta header with one
        # writev, never re-encoded or copied (docs/benchmarks.md, "Node").
        raw = req.DataSet.getvalue()  # the BytesIO's own buffer, not a copy
        transfer_syntax = UID(event.context.transfer_syntax)
        try:
            ds = read_received(raw, transfer_syntax)
            ds_sop_uid, ds_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
            series_uid, study_uid = ds.get("SeriesInstanceUID"), ds.get("StudyInstanceUID")
        except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot understand"
            raise Refused(CANNOT_UNDERSTAND, f"data set cannot be decoded: {type(exc).__name__}") from None
        if ds_sop_uid is None or str(ds_sop_uid) != sop_uid or str(ds_class) != sop_class:
            raise Refused(DOES_NOT_MATCH, "SOP Class/Instance UID in the data set differ from the request")
        series_uid = safe_uid(series_uid, "Series Instance UID")
        safe_uid(study_uid, "Study Instance UID")
        for_job = "series" if sop_class in JOB_SOP_CLASSES else "image" if (
            self.image_defaults is not None and starts_image_job(ds)) else None
        if for_job:
            try:
                check_pixel_data(ds, transfer_syntax, len(raw))
            except Refused:
                raise
            except Exception as exc:
                raise Refused(CANNOT_UNDERSTAND, f"Pixel Data cannot be checked: {type(exc).__name__}") from None
        folder = {"series": "series", "image": "images"}.get(for_job or "", "other")
        path = self.root / folder / series_uid / f"{sop_uid}.dcm"
        if os.path.dirname(os.path.dirname(os.path.dirname(os.path.normpath(path)))) != str(self.root):
            raise Refused(CANNOT_UNDERSTAND, "path outside the storage directory")  # belt and braces: see _UID
        try:
            self.writer.write(path, [self.headers.header(sop_class, sop_uid, transfer_syntax), raw])
        except OSError as exc:
            raise Refused(OUT_OF_RESOURCES, f"cannot write instance: {exc.strerror}") from None
        return path, ds, for_job

    def _queue_image(self, ds: Dataset, path: Path, calling_ae: str | None = None) -> None:
        """One X-ray image is one job, queued now: the image is durable already (``DurableWriter``). The
        distributed mode's STAT rule applies as to a series."""
        series_uid = str(ds.SeriesInstanceUID)
        stat = bool(self.stat_rule) and is_stat(self.stat_rule, {**dataset_facts(ds), "calling_ae_title": calling_ae})
        job, created = self.store.ensure_job(series_uid, str(ds.StudyInstanceUID), str(path), state="queued",
                                             details={"kind": "image", **({"stat": True} if stat else {})},
                                             **(self.image_defaults or {}))
        if created:
            self.store.record_instances(job.id, 1)
            log_event("job.queued", job=job.id, series=series_uid, kind="image")
            self.tracker.on_queued(job.id)

    def _track(self, event, ds: Dataset, path: Path) -> None:
        series_uid = str(ds.SeriesInstanceUID)
        expected = None
        if "ImagesInAcquisition" in ds and str(ds.SOPClassUID) == str(CTImageStorage):
            try:
                expected = int(ds.ImagesInAcquisition) or None
            except (TypeError, ValueError):
                expected = None
        elif str(ds.SOPClassUID) == str(EnhancedCTImageStorage) and int(ds.get("NumberOfFrames", 1) or 1) > 1:
            expected = 1
        with self._series_lock:  # one job per series even when several associations send it at once
            job_id = self.tracker.open_job(series_uid)
            if job_id is None:
                job, created = self.store.ensure_job(
                    series_uid, str(ds.StudyInstanceUID), str(path.parent), state="received", **self.job_defaults
                )
                if job.state != "received":  # complete and queued, not yet claimed: it will read this file
                    return
                job_id = job.id
                if created:
                    log_event("job.received", job=job_id, series=series_uid, study=str(ds.StudyInstanceUID))
            self.tracker.arrived(job_id, series_uid, id(event.assoc), expected)
            if self.stat_rule and job_id not in self._stat_jobs and is_stat(
                    self.stat_rule, {**dataset_facts(ds), "calling_ae_title": event.assoc.requestor.ae_title}):
                # In the job record at once, so a restart before completion keeps it; the node queues by it.
                self.store.record_instances(job_id, 0, details={"stat": True})
                self._stat_jobs.add(job_id)
