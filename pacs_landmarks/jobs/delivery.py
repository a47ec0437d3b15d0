"""C-STORE of the result objects to a destination (the node's ``deliver`` callable for the Worker).

Success means every file got status 0x0000 or a Warning (0x0001, 0xBxxx: stored, PS3.4 B.2.3). Status
0x0122 (SOP class not supported), 0xA9xx (data set does not match) and a rejected presentation context are
permanent (retrying the same object cannot help); refused or failed connections, association rejections,
timeouts and other failure statuses are retried by the Worker with back-off.
"""
from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.transport import AssociationSocket

from pacs_landmarks.jobs.worker import PermanentDeliveryError


class DeliveryError(ConnectionError):
    """A transient delivery failure (destination down, busy, or answered a failure status)."""


class _NoDelayAE(AE):
    """Sets TCP_NODELAY on the outgoing socket (DIMSE request/response traffic), as the node's listener does on
    incoming ones (node/receivers.py)."""

    def _create_socket(self, assoc, address, tls_args) -> AssociationSocket:  # type: ignore[override]
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def client_ssl_context(dest: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.get("tls_ca"))
    if dest.get("tls_cert"):
        ctx.load_cert_chain(dest["tls_cert"], dest.get("tls_key"))
    return ctx


class StoreSCU:
    """``deliver(job, destination, paths)`` over DICOM C-STORE, with our AE title as calling AE."""

    def __init__(self, ae_title: str, timeout_s: float = 30.0):
        self.ae_title = ae_title
        self.timeout_s = timeout_s

    def __call__(self, job: Any, destination: dict[str, Any], paths: list[Path]) -> None:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        ae = _NoDelayAE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        for sop_class in sorted({str(h.SOPClassUID) for h in headers}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls_args = None
        if destination.get("tls"):
            tls_args = (client_ssl_context(destination), destination["host"])
        where = f"{destination['ae_title']}@{destination['host']}:{destination['port']}"
        assoc = ae.associate(destination["host"], int(destination["port"]), ae_title=destination["ae_title"],
                             tls_args=tls_args)
        if not assoc.is_established:
            what = "rejected the association" if assoc.is_rejected else "is unreachable"
            raise DeliveryError(f"{where} {what}")
        try:
            for path, header in zip(paths, headers):
                accepted = any(cx.abstract_syntax == header.SOPClassUID for cx in assoc.accepted_contexts)
                if not accepted:
                    raise PermanentDeliveryError(f"{where} does not accept SOP class {header.SOPClassUID}")
                status = assoc.send_c_store(path)
                if "Status" not in status:
                    raise DeliveryError(f"{where}: no C-STORE response (timeout or abort)")
                code = int(status.Status)
                if code == 0x0000 or code == 0x0001 or (code & 0xF000) == 0xB000:
                    continue
                if code == 0x0122 or (code & 0xFF00) == 0xA900:
                    raise PermanentDeliveryError(f"{where} refused {path.name}: status 0x{code:04X}")
                raise DeliveryError(f"{where} refused {path.name}: status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
