"""The node's receive path (node/receive.py): what it relies on in pynetdicom, the wake-ups, the group commit."""
from __future__ import annotations

import os
import socket
import threading
import time

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from pacs_landmarks.node import receive
from pacs_landmarks.node.receive import DurableWriter, WakingSocket, install_wakeups


@pytest.fixture
def acceptor():
    """A real pynetdicom acceptor association on one end of a socket pair, as the node's server makes it."""
    ours, peer = socket.socketpair()
    assoc = Association(AE(), MODE_ACCEPTOR)
    assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
    yield assoc, peer
    assoc.dul.socket.close()
    peer.close()


def test_pinned_pynetdicom_has_what_receive_relies_on(acceptor):
    major, minor = (int(x) for x in pynetdicom.__version__.split(".")[:2])
    assert (major, minor) == (3, 0), "node/receive.py is checked against pynetdicom 3.0: re-check, then re-pin"
    assoc, _ = acceptor
    assert assoc.dul._run_loop_delay == 0.001  # the polling delay install_wakeups turns off
    install_wakeups(assoc)
    assert isinstance(assoc.dul.socket, WakingSocket)
    assert assoc.dul._run_loop_delay == 0
    assert isinstance(assoc.dul.to_provider_queue, receive._WakingQueue)
    assert isinstance(assoc.dimse.msg_queue, receive._WaitingQueue)


def test_install_refuses_a_changed_pynetdicom(acceptor):
    assoc, _ = acceptor
    del assoc.dimse.msg_queue
    with pytest.raises(RuntimeError, match="msg_queue is gone"):
        install_wakeups(assoc)


def test_ready_waits_for_data_and_wakes_on_an_outgoing_primitive(acceptor, monkeypatch):
    assoc, peer = acceptor
    install_wakeups(assoc)
    sock = assoc.dul.socket
    monkeypatch.setattr(receive, "WAIT_S", 60.0)  # only data or a wake-up can end the wait now
    assert assoc.dul.event_queue.get(False) == "Evt5"  # the connection's event, as the DUL takes it first
    peer.sendall(b"x")
    assert sock.ready is True and bytes(sock.recv(1)) == b"x"

    answers = []
    waiter = threading.Thread(target=lambda: answers.append(sock.ready))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # nothing to read, nothing queued: still waiting
    assoc.dul.to_provider_queue.put("primitive")  # what pynetdicom does to send a C-STORE response
    waiter.join(10)
    assert not waiter.is_alive() and answers == [False]
    assert assoc.dul.to_provider_queue.get(False) == "primitive"  # pynetdicom's non-blocking get still works


def test_ready_does_not_wait_while_the_dul_has_an_event_queued(acceptor, monkeypatch):
    """The DUL handles one event per turn of its loop and asks ``ready`` before each: an accepted connection
    queues Evt5, and the A-ASSOCIATE-RQ read in the same turn queues Evt6 behind it. Waiting in ``ready``
    then delayed every association's A-ASSOCIATE-AC by the full wait (10 ms, strace of the node)."""
    assoc, peer = acceptor
    install_wakeups(assoc)
    monkeypatch.setattr(receive, "WAIT_S", 60.0)
    sock = assoc.dul.socket
    assert assoc.dul.event_queue.qsize() == 1  # Evt5, queued by AssociationSocket for an accepted connection
    t = time.monotonic()
    assert sock.ready is False and time.monotonic() - t < 5  # nothing to read: it looked, it did not wait
    peer.sendall(b"x")
    assert sock.ready is True


def test_reactor_get_waits_for_a_message(acceptor, monkeypatch):
    assoc, _ = acceptor
    install_wakeups(assoc)
    monkeypatch.setattr(receive, "WAIT_S", 60.0)
    threading.Timer(0.2, assoc.dimse.msg_queue.put, args=[(1, "C-STORE-RQ")]).start()
    assert assoc.dimse.get_msg(block=False) == (1, "C-STORE-RQ")  # the reactor's call: waited, not empty


def test_a_release_request_ends_the_reactor_wait(acceptor, monkeypatch):
    """An A-RELEASE-RQ arrives on the DUL's queue to the user, not the DIMSE queue: the reactor's wait for a
    DIMSE message ends at once, and a release queued just before the wait does not make it wait either."""
    from pynetdicom.pdu_primitives import A_RELEASE

    assoc, _ = acceptor
    install_wakeups(assoc)
    assert isinstance(assoc.dul.to_user_queue, receive._WakingQueue)
    monkeypatch.setattr(receive, "WAIT_S", 60.0)
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(assoc.dimse.get_msg(block=False)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    assoc.dul.to_user_queue.put(A_RELEASE())  # what pynetdicom's state machine does on an A-RELEASE-RQ PDU
    waiter.join(10)
    assert not waiter.is_alive() and answers == [(None, None)]  # empty: the reactor goes on to check release
    assert assoc.acse.is_release_requested()

    assoc.dul.to_user_queue.put(A_RELEASE())
    t = time.monotonic()
    assert assoc.dimse.get_msg(block=False) == (None, None) and time.monotonic() - t < 5


def test_durable_writer_group_commits_the_folder_fsync(tmp_path):
    writer, n_threads, per_thread = DurableWriter(), 8, 15
    payload = {f"{t}.{i}": os.urandom(64 * 1024) for t in range(n_threads) for i in range(per_thread)}
    folder = tmp_path / "series" / "1.2.3"

    def send(t):
        for i in range(per_thread):
            writer.write(folder / f"{t}.{i}.dcm", payload[f"{t}.{i}"])

    threads = [threading.Thread(target=send, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{k}.dcm" for k in payload)  # every file, no temporary file left behind
    assert all((folder / f"{k}.dcm").read_bytes() == v for k, v in payload.items())
    synced = writer._folders[folder]
    assert synced.durable == synced.issued == len(payload)  # every rename covered by a finished fsync
    assert synced.fsyncs < len(payload)  # ... with fewer folder fsyncs than files: shared between writers


@pytest.mark.parametrize("size", [receive.DIRECT_MIN, receive.DIRECT_MIN + 1, 530_001, 4 * receive.DIRECT_ALIGN * 40])
def test_direct_writes_are_byte_exact_without_padding(tmp_path, size):
    """Direct I/O for the aligned part, the tail buffered: the file is exactly the buffers, one after the other."""
    writer = DurableWriter()
    header, body = os.urandom(333), os.urandom(size - 333)
    path = tmp_path / "series" / "1.2" / "1.2.3.dcm"
    writer.write(path, [header, memoryview(body)])
    assert path.read_bytes() == header + body
    assert writer.direct_writes == 1, "this filesystem (the test's tmp_path) should take direct I/O"
    writer.write(path, [body, header])  # a resend replaces it, with direct I/O too
    assert path.read_bytes() == body + header and writer.direct_writes == 2
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.dcm"]


def test_small_files_and_direct_off_are_written_buffered(tmp_path):
    writer, small = DurableWriter(), os.urandom(receive.DIRECT_MIN - 1)
    writer.write(tmp_path / "a.dcm", small)
    assert (tmp_path / "a.dcm").read_bytes() == small and writer.direct_writes == 0
    buffered, big = DurableWriter(direct=False), os.urandom(530_001)
    buffered.write(tmp_path / "b.dcm", big)
    assert (tmp_path / "b.dcm").read_bytes() == big and buffered.direct_writes == 0


def test_direct_writes_from_concurrent_threads_keep_their_own_buffers(tmp_path):
    writer, n_threads, per_thread = DurableWriter(), 6, 6
    payload = {f"{t}.{i}": os.urandom(200_000 + 4099 * t + i) for t in range(n_threads) for i in range(per_thread)}

    def send(t):
        for i in range(per_thread):
            writer.write(tmp_path / f"{t}.{i}.dcm", [b"DICM", payload[f"{t}.{i}"]])

    threads = [threading.Thread(target=send, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert all((tmp_path / f"{k}.dcm").read_bytes() == b"DICM" + v for k, v in payload.items())
    assert writer.direct_writes == len(payload)
    assert len(writer._buffers._idle) <= n_threads  # reused, one per concurrent writer at most


def test_a_large_instance_does_not_keep_its_aligned_buffer(tmp_path):
    writer = DurableWriter()
    big, small = os.urandom(receive._AlignedBuffers.KEEP_BYTES + 12_345), os.urandom(300_000)
    writer.write(tmp_path / "big.dcm", big)
    writer.write(tmp_path / "small.dcm", small)
    assert (tmp_path / "big.dcm").read_bytes() == big and (tmp_path / "small.dcm").read_bytes() == small
    assert writer.direct_writes == 2
    assert [len(b) for b in writer._buffers._idle] == [1024 * 1024]  # only the small one's buffer is kept


def test_durable_writer_recreates_a_purged_folder(tmp_path):
    import shutil

    writer, folder = DurableWriter(), tmp_path / "other" / "1.2"
    writer.write(folder / "a.dcm", b"one")
    shutil.rmtree(folder)
    writer.write(folder / "b.dcm", b"two")
    assert (folder / "b.dcm").read_bytes() == b"two"


def test_durable_writer_replaces_an_earlier_copy(tmp_path):
    writer, path = DurableWriter(), tmp_path / "series" / "1.2" / "1.2.3.dcm"
    writer.write(path, b"first")
    writer.write(path, b"second")  # a resend: flushed before it replaces the acknowledged copy
    assert path.read_bytes() == b"second" and [p.name for p in path.parent.iterdir()] == ["1.2.3.dcm"]


def test_files_a_power_loss_cut_short_are_set_aside_at_start(tmp_path):
    """What a power loss can leave of a never-acknowledged instance (renamed before its flush): moved aside,
    whole files stay."""
    import shutil

    from pydicom.data import get_testdata_file

    from pacs_landmarks.node.app import set_aside_incomplete

    folder = tmp_path / "series" / "1.2.3"
    folder.mkdir(parents=True)
    whole = folder / "1.1.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), whole)
    data = whole.read_bytes()
    (folder / "1.2.dcm").write_bytes(b"")
    (folder / "1.3.dcm").write_bytes(data[: len(data) * 2 // 3])  # header whole, pixel data cut
    (folder / "1.4.dcm").write_bytes(data[:300])  # cut inside the header
    moved = set_aside_incomplete(folder, tmp_path / "incomplete")
    assert sorted(p.name for p in moved) == ["1.2.dcm", "1.3.dcm", "1.4.dcm"]
    assert [p.name for p in folder.iterdir()] == ["1.1.dcm"] and whole.read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "incomplete" / "1.2.3").iterdir()) == ["1.2.dcm", "1.3.dcm", "1.4.dcm"]


def test_quiet_pynetdicom_binds_no_per_pdu_log_formatting(monkeypatch):
    from pynetdicom import _config, evt

    from pacs_landmarks.node.receive import quiet_pynetdicom

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")  # restored after the test
    noisy = Association(AE(), MODE_ACCEPTOR)
    assert noisy.get_handlers(evt.EVT_PDU_RECV)  # pynetdicom's default: a formatter on every PDU
    quiet_pynetdicom()
    quiet = Association(AE(), MODE_ACCEPTOR)
    for event in (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT):
        assert not quiet.get_handlers(event)


def test_wake_pipes_do_not_leak(tmp_path):
    """pynetdicom ends a released association without close(): the wake-up pipe goes with the garbage."""
    import gc
    import itertools
    import subprocess

    from pynetdicom.sop_class import Verification

    from conftest import dcmtk
    from pacs_landmarks.node.scp import _Handler

    def pipes() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    ae = AE(ae_title="LEAKTEST")
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", 0), request_handler=_Handler)  # the node's request handler
    server.serials, server.over_limit = itertools.count(), {}  # what scp.HostedServer gives _Handler
    ae._servers.append(server)  # so that shutdown() can deregister it
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        gc.collect()
        before = pipes()
        for _ in range(25):
            proc = subprocess.run([dcmtk("echoscu"), "-aec", "LEAKTEST", "127.0.0.1", str(port)],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 10
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        gc.collect()
        assert pipes() <= before + 2  # 25 associations made 25 pipes (50 descriptors); all but a live one gone
    finally:
        server.shutdown()


@pytest.mark.parametrize("uid", ["1.2.3.4", "1.2.3.45", "1." + "2" * 62])
@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"])
def test_file_headers_are_the_bytes_pynetdicom_encodes(uid, ts):
    """Odd and even UID lengths (the odd one padded), and the template reused for a second UID of that length."""
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from pacs_landmarks.node.receive import FileHeaders

    headers, ct = FileHeaders(), "1.2.840.10008.5.1.4.1.1.2"
    for this in (uid, uid[:-1] + ("7" if uid[-1] != "7" else "8")):
        meta = create_file_meta(sop_class_uid=UID(ct), sop_instance_uid=UID(this), transfer_syntax=UID(ts))
        assert headers.header(ct, this, ts) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)


def test_received_data_set_is_checked_and_written_as_it_arrived(tmp_path):
    """read_received defers native Pixel Data, check_pixel_data still finds it cut short; the file written from a
    header and the raw bytes is the data set as sent, and reads back whole."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.filewriter import write_dataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from pacs_landmarks.node.receive import FileHeaders
    from pacs_landmarks.node.scp import Refused, check_pixel_data, read_received

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        fp = pydicom.filebase.DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, ts.is_implicit_VR
        src.PixelData = bytes(range(256)) * 512  # 128 KB: over DEFER_BYTES, so its read is deferred
        src.Rows, src.Columns = 256, 256
        write_dataset(fp, src)
        raw = fp.getvalue()
        ds = read_received(raw, ts)
        assert ds.get_item(0x7FE00010, keep_deferred=True).value is None  # not read
        check_pixel_data(ds, ts, len(raw))
        cut = raw[: ds.get_item(0x7FE00010, keep_deferred=True).value_tell + 1000]  # inside Pixel Data
        with pytest.raises(Refused, match="truncated"):
            check_pixel_data(read_received(cut, ts), ts, len(cut))
        path = tmp_path / f"{ts}.dcm"
        DurableWriter().write(path, [FileHeaders().header(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts), raw])
        assert path.read_bytes()[-len(raw):] == raw
        back = pydicom.dcmread(path)
        assert back.file_meta.TransferSyntaxUID == ts and back.PixelData == src.PixelData
        assert back.SOPInstanceUID == src.SOPInstanceUID


def test_supported_contexts_copy_without_revalidating_and_stay_apart():
    import copy

    from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

    from pacs_landmarks.node.receive import copyable_contexts

    ae = AE()
    for cx in AllStoragePresentationContexts[:5]:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ours = copyable_contexts(ae.supported_contexts)
    copied = copy.deepcopy(ours)
    assert [(c.abstract_syntax, c.transfer_syntax) for c in copied] == \
        [(c.abstract_syntax, c.transfer_syntax) for c in ae.supported_contexts]
    copied[0].context_id = 7  # what pynetdicom's negotiation does to its per-association copy
    copied[0]._transfer_syntax.append("1.2.840.10008.1.2.2")
    assert ours[0].context_id is None and len(ours[0].transfer_syntax) == 2
    strange = PresentationContext()
    strange.abstract_syntax = "1.2.840.10008.1.1"
    strange.mutable = {"a": 1}  # what a pynetdicom upgrade could add: the list copy would share it
    with pytest.raises(RuntimeError, match="not immutable"):
        copyable_contexts([strange])


def test_uid_validation_verdicts_are_remembered_and_still_refuse(monkeypatch):
    from pynetdicom import _config
    from pynetdicom.presentation import PresentationContext

    from pacs_landmarks.node.receive import cache_uid_validation

    monkeypatch.setitem(_config.VALIDATORS, "UI", _config.VALIDATORS["UI"])  # restored after the test
    calls = []
    original = _config.VALIDATORS["UI"]
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda v: (calls.append(v), original(v))[1])
    cache_uid_validation()
    cache_uid_validation()  # twice: still one layer
    for _ in range(3):
        PresentationContext().abstract_syntax = "1.2.840.10008.5.1.4.1.1.2"
    assert calls == ["1.2.840.10008.5.1.4.1.1.2"]
    with pytest.raises(ValueError):
        PresentationContext().abstract_syntax = "1.2." + "3" * 70  # too long: refused, and again from the cache
    with pytest.raises(ValueError):
        PresentationContext().abstract_syntax = "1.2." + "3" * 70
    monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", True)  # part of the key: asked again
    with pytest.raises(ValueError):
        PresentationContext().abstract_syntax = "1.02.3"
