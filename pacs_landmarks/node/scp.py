"""The node's DICOM service: Verification + Storage SCP (PS3.4 Annex A and B) over pynetdicom, as it runs in
each receiver process (receivers.py).

- Every storage SOP class is accepted (``AllStoragePresentationContexts``) with the transfer syntaxes in
  ``TRANSFER_SYNTAXES``. CT Image Storage and Enhanced CT Image Storage instances go to ``series/`` and join
  their series' job (intake.py); with a 2D model loaded (``image_jobs``), each single-frame X-ray image (DX For
  Presentation / For Processing, CR, Secondary Capture that is not a screen capture of another modality:
  ``jobs.steps.starts_image_job``) goes to ``images/<SeriesUID>/<SOP>.dcm`` and starts its own job. Any other
  object is still stored (under ``other/``, nothing a PACS sends is dropped) and logged once per series as
  ignored.
- An instance is written as received (the encoded dataset, PS3.10 file meta added) and is durable, data and
  name, before Success (0x0000) is answered (``receive.DurableWriter``: temporary file, rename, fdatasync
  beside a group-committed folder fsync), and the node's intake has taken it (a job knows it). Paths are built
  from UIDs that match the PS3.5 9.1 character repertoire only (digits and dots): anything else is refused, so
  nothing is written outside the storage directory.
- Refusals (PS3.4 B.2.3): 0xA700 out of resources (too large, disk error, job store unreachable), 0xA900 data
  set does not match the SOP class (UIDs differ from the request, UIDs missing), 0xC000 cannot understand
  (undecodable, truncated, bad UID).
- Each association waits on its socket and queues instead of polling (``receive.install_wakeups``).
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
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
class Stored:
    """What a receiver reports to the node's intake (intake.py) for each instance it stored."""

    path: str
    series_uid: str
    study_uid: str
    for_job: str | None  # "series" (a CT instance), "image" (an X-ray image job) or None (stored under other/)
    sop_class: str
    modality: str
    expected: int | None = None  # instances the series will have, when the instance says so
    stat: bool = False  # the distributed mode's STAT rule matched


class _Handler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        install_wakeups(assoc)  # wait on the socket and queues instead of pynetdicom's 1 ms polls (receive.py)
        # The node's name for the association: unique over every receiver process and its lifetime (id() is
        # reused once an association is gone).
        assoc.node_key = (os.getpid(), next(self.server.serials))
        return assoc


class HostedServer(ThreadedAssociationServer):
    """pynetdicom's server without a listening socket of its own: the node's listener accepts each connection
    (``receivers.ReceiverPool``) and hands it to ``serve``; TLS is set up here, in the connection's thread."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self.serials = itertools.count(1)
        kwargs.setdefault("request_handler", _Handler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:  # the listening socket is the node's, in its main process
        pass

    def server_activate(self) -> None:
        pass

    def serve(self, sock: socket.socket, address: tuple) -> None:
        """Run the association of one accepted connection in its own threads (as ``process_request`` does)."""
        self.process_request(sock, address)

    def finish_request(self, request, client_address) -> None:
        if self.ssl_context:
            request = self.ssl_context.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)


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
    """The DICOM service of one receiver process (receivers.py): checks, writes and reports each instance.

    ``report(message)`` sends a message to the node's intake and returns its answer (``receivers``): an
    instance is reported after it is durable and before its Success, so that the intake has taken it (a job,
    a queued image) when the sender hears Success. ``image_jobs``: X-ray images that start an image job are
    stored under ``images/`` (False: they go to ``other/``, not analysed).
    """

    def __init__(self, cfg: NodeConfig, report: Callable[[tuple], tuple], image_jobs: bool = False,
                 index: int = 0):
        self.cfg = cfg
        self.index = index  # this receiver's number (receivers.py), in its log events
        self.report = report
        self.image_jobs = image_jobs
        self.root = cfg.storage_path.resolve()
        self.max_bytes = int(cfg.max_instance_mb * 1024 * 1024)
        self._allow = {a.ae_title: a.addresses for a in cfg.allow}
        self._assoc_counts: dict[tuple, int] = {}
        # The distributed mode's STAT rule (jobs/priority.py): a matching instance marks its series' job STAT.
        self.stat_rule = (cfg.cluster.get("stat_rule") or {}) if cfg.queue == "postgres" else {}
        self.writer = DurableWriter()
        self.headers = FileHeaders()
        self.server: HostedServer | None = None

        quiet_pynetdicom()  # no per-PDU log formatting for a logger kept at WARNING (receive.py)
        cache_uid_validation()  # A-ASSOCIATE-RQs repeat the same UIDs (receive.py)
        ae = AE(ae_title=cfg.ae_title)
        # The node's limit is its admission over every receiver (receivers.py); pynetdicom's own count in this
        # process also holds connections that never sent a request (until its ACSE timeout): only a backstop.
        ae.maximum_associations = cfg.max_associations + 100
        # Larger PDUs than pynetdicom's 16 KB default: ~30x fewer PDUs per CT slice through its Python DUL
        # (measured 106 -> 175 instances/s without fsync); still bounded, as a PDU is held in memory.
        ae.maximum_pdu_size = 4 * 1024 * 1024
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae = ae

    # -- lifecycle -----------------------------------------------------------------------------------------
    def host(self, address: tuple[str, int]) -> HostedServer:
        """The server that runs the associations handed over; ``address``: the node's listening address."""
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, lambda e: self._on_end(e, "released")),
            (evt.EVT_ABORTED, lambda e: self._on_end(e, "aborted")),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        self.server = HostedServer(
            self.ae, address, self.cfg.ae_title,
            copyable_contexts(self.ae.supported_contexts),  # copied per association: receive.py
            ssl_context=server_ssl_context(self.cfg), evt_handlers=handlers,
        )
        return self.server

    def stop(self) -> None:
        """Abort the associations still open (the node is stopping: their senders retry what was not acknowledged)."""
        for assoc in list(self.ae.active_associations):
            assoc.abort()

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
                return
        # max_associations counts the node's associations in every receiver: the node admits this one or not
        if self.report(("admit", event.assoc.node_key)) != ("ok", True):
            log_event("association.rejected", logging.WARNING, calling_ae=calling, address=address,
                      reason=f"max_associations ({self.cfg.max_associations}) open")
            # PS3.8 9.3.4: rejected-transient, service-provider (presentation), local-limit-exceeded
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)
            event.assoc.kill()

    def _on_established(self, event) -> None:
        self._assoc_counts[event.assoc.node_key] = 0
        rq = event.assoc.requestor
        log_event("association.accepted", calling_ae=rq.ae_title, address=f"{rq.address}:{rq.port}",
                  tls=bool(self.cfg.tls_cert) or None, receiver=self.index)

    def _on_end(self, event, how: str) -> None:
        rq = event.assoc.requestor
        log_event(f"association.{how}", calling_ae=rq.ae_title,
                  instances=self._assoc_counts.get(event.assoc.node_key, 0))
        if how == "aborted":
            self.report(("aborted", event.assoc.node_key))

    def _on_conn_close(self, event) -> None:
        key = event.assoc.node_key
        self._assoc_counts.pop(key, None)
        self.report(("end", key, bool(event.assoc.is_aborted)))

    # -- C-STORE -------------------------------------------------------------------------------------------
    def _on_store(self, event) -> int:
        key = event.assoc.node_key
        try:
            item = self._store(event)
        except Refused as exc:
            log_event("instance.refused", logging.WARNING, calling_ae=event.assoc.requestor.ae_title,
                      status=f"0x{exc.status:04X}", reason=str(exc))
            return exc.status
        answer = self.report(("store", key, item))
        if answer[0] != "ok":  # the file is durable, but no job knows it: the sender must send it again
            log_event("instance.refused", logging.ERROR, calling_ae=event.assoc.requestor.ae_title,
                      status=f"0x{OUT_OF_RESOURCES:04X}", reason=f"job store: {answer[1]}")
            return OUT_OF_RESOURCES
        self._assoc_counts[key] = self._assoc_counts.get(key, 0) + 1
        return SUCCESS

    def _store(self, event) -> Stored:
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
        study_uid = safe_uid(study_uid, "Study Instance UID")
        for_job = "series" if sop_class in JOB_SOP_CLASSES else "image" if (
            self.image_jobs and starts_image_job(ds)) else None
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
        stat = bool(self.stat_rule) and is_stat(self.stat_rule, {**dataset_facts(ds),
                                                                 "calling_ae_title": event.assoc.requestor.ae_title})
        return Stored(str(path), series_uid, study_uid, for_job, sop_class, str(ds.get("Modality", "")),
                      expected_count(ds) if for_job == "series" else None, stat)


def expected_count(ds: Dataset) -> int | None:
    """The number of instances of the series, when the instance says it: Images in Acquisition (0020,1002)
    of a CT image; 1 for a multi-frame Enhanced CT instance (a whole volume)."""
    if "ImagesInAcquisition" in ds and str(ds.SOPClassUID) == str(CTImageStorage):
        try:
            return int(ds.ImagesInAcquisition) or None
        except (TypeError, ValueError):
            return None
    if str(ds.SOPClassUID) == str(EnhancedCTImageStorage) and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return 1
    return None
