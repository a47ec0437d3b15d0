"""The node's receive path under pynetdicom: wake on events instead of polling, and durable writes with group commit.

pynetdicom 3.0 runs two threads per association that poll: the DUL thread checks the socket and its outgoing
queue, then sleeps ``DULServiceProvider._run_loop_delay`` (1 ms) when neither had anything; the association
thread sleeps 1 ms before each look at its DIMSE message queue. Measured on the node, about half of pynetdicom's
time around each C-STORE was those sleeps (docs/benchmarks.md, "Node"). :func:`install_wakeups` makes both
threads *wait* for the thing they poll for, with the hooks pynetdicom itself provides:

- the transport (``AssociationSocket``, which pynetdicom lets a server replace per association) answers
  ``ready`` by waiting in ``select`` on the socket *and* a wake-up descriptor, for at most ``WAIT_S`` (not at
  all while the DUL's event queue holds an event: it handles one per turn of its loop); the
  DUL's loop delay (``_run_loop_delay``, "setting it higher uses less CPU when idle", pynetdicom's own
  comment) is 0, so the thread waits in ``select`` instead of sleeping;
- the DUL's outgoing queue (``DULServiceProvider.to_provider_queue``) signals the wake-up descriptor on
  ``put``, so a C-STORE response is sent as soon as the association thread queues it;
- the DIMSE message queue (``DIMSEServiceProvider.msg_queue``) lets the association reactor's non-blocking
  ``get`` wait up to ``WAIT_S`` for the next message, so the reactor's fixed 1 ms sleep overlaps the time the
  sender needs for its next instance instead of adding to it;
- the DUL's queue to the user (``DULServiceProvider.to_user_queue``, where an A-RELEASE request arrives)
  ends that wait on ``put``: the reactor answers a release at once instead of after ``WAIT_S`` (10 ms more
  per association before).

Every timer and state check pynetdicom does each loop still runs at least every ``WAIT_S``. What this relies
on is checked when an association is set up (:func:`install_wakeups` raises if an attribute is gone) and by
tests/test_node_receive.py against the pinned pynetdicom range in pyproject.toml.

:class:`DurableWriter` makes each instance durable before its Success: data flushed (``fdatasync``) and the name
made durable by an ``fsync`` of the folder (POSIX asks for both). The data goes to the disk with direct I/O
(``O_DIRECT``, from a reused page-aligned buffer) where the file system takes it: no copy into the page cache. A
new file is renamed into place *before* its flush, so that the folder fsync (in a syncer thread) and the file's
flush run at the same time; on the CI disk (ext4 without a journal, where both are needed) that is 3-5 ms per
instance instead of 9-11 ms one after the other. A file that replaces an earlier copy (a resend) is flushed
before the rename, so an acknowledged copy is never replaced by data not yet on disk. What a power loss can
leave is therefore limited to instances never acknowledged: an empty or cut-off file under its name, which the
node moves aside at start (``app.set_aside_incomplete``) and the sender's retry replaces. Each folder fsync
covers every rename made before it started: concurrent associations share them (group commit).
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import select
import ssl
import threading
import time
from pathlib import Path

from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

WAIT_S = 0.01  # longest wait of either thread: bounds the delay of pynetdicom's timer and state checks


class WakingSocket(AssociationSocket):
    """``ready`` waits for data or a wake-up (see the module docstring); ``recv`` fills one buffer.

    pynetdicom reads a PDU 4 KB per ``recv()`` into a growing bytearray; one preallocated buffer filled with
    ``recv_into()`` is ~30 % faster for CT-sized PDUs (bench/node.py).
    """

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (AttributeError, OSError):  # not installed yet, or closed: the DUL loop wakes by itself
            pass

    def _open_wake_pipe(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def ready(self) -> bool:  # type: ignore[override]
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(0.001)  # closed: the DUL stops soon; with its loop delay at 0, pause as it would have
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # TLS may hold decrypted bytes that select() cannot see (pynetdicom #528)
        # The DUL handles one event per turn of its loop and asks ``ready`` first: with an event still queued
        # (an A-ASSOCIATE-RQ read in the same turn as the connection's Evt5) it must look, not wait.
        timeout = 0 if self.event_queue.qsize() else WAIT_S
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], timeout)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom's own ``ready`` does
            return False
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view, n = memoryview(buf), 0
        while n < nr_bytes:
            got = self.socket.recv_into(view[n:], nr_bytes - n)
            if not got:  # connection closed: return what arrived, as pynetdicom does
                del view
                return buf[:n]
            n += got
        return buf

    def close(self) -> None:
        super().close()
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        for fd in (getattr(self, "_wake_r", None), getattr(self, "_wake_w", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = None

    def __del__(self) -> None:
        # pynetdicom ends a released association without calling close() (its DUL stops on Evt17 and the
        # objects are freed by the garbage collector, TCP socket included): the pipe goes with them.
        self._close_wake_pipe()


class _WakingQueue(queue.Queue):
    """A queue whose every ``put`` wakes the thread that waits for it: the DUL thread out of its ``select``
    (its outgoing queue), the association reactor out of its wait for a DIMSE message (the queue to it)."""

    def __init__(self, wake) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        self._wake()


class _WaitingQueue(queue.Queue):
    """The DIMSE message queue: the association reactor's non-blocking ``get`` waits up to ``WAIT_S`` for a
    message, or until :meth:`poke` (something for the reactor arrived elsewhere: an A-RELEASE request)."""

    def __init__(self) -> None:
        super().__init__()
        self._poked = False

    def get(self, block=True, timeout=None):
        if block:
            return super().get(block, timeout)
        with self.not_empty:
            if not self._qsize() and not self._poked:
                self.not_empty.wait(WAIT_S)
            self._poked = False
            if not self._qsize():
                raise queue.Empty
            item = self._get()
            self.not_full.notify()
            return item

    def poke(self) -> None:
        with self.not_empty:
            self._poked = True  # a poke just before the wait starts is not missed
            self.not_empty.notify_all()


class CopyableContext(PresentationContext):
    """A supported presentation context whose deep copy is a copy of its lists.

    pynetdicom deep-copies the server's supported contexts for every association it accepts
    (``RequestHandler._create_association``); for the node's 171 contexts with 11 transfer syntaxes each the
    generic ``deepcopy`` rebuilds and re-validates ~2,000 pydicom ``UID`` objects: 22 ms per association on
    the CI CPU, held under the GIL while other associations wait (bench/node.py, 4 and 8 senders). Every
    attribute of a context is immutable (``str``/``UID``, ``int``, ``bool``, ``None``) or a list of those
    (checked by :func:`copyable_contexts`), so copying the lists is a deep copy.
    """

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        new.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()})
        return new


_IMMUTABLE = (str, int, bool, type(None))


def copyable_contexts(contexts: list[PresentationContext]) -> list[CopyableContext]:
    """The same contexts as :class:`CopyableContext` (for ``AE.make_server(contexts=...)``).

    Raises if a context holds anything but immutable values and lists of them (a pynetdicom upgrade that adds
    a mutable attribute would make the list copy shallow): fail loudly rather than share state between
    associations.
    """
    copies = []
    for cx in contexts:
        for name, value in vars(cx).items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, _IMMUTABLE) for v in values):
                raise RuntimeError(f"pynetdicom PresentationContext.{name} is not immutable: update node/receive.py")
        new = object.__new__(CopyableContext)
        new.__dict__.update(vars(cx))
        copies.append(new)
    return copies


def quiet_pynetdicom() -> None:
    """Turn off pynetdicom's "standard" logging handlers, process-wide, with its own switch
    (``pynetdicom._config.LOG_HANDLER_LEVEL = "none"``, its documented way).

    Those handlers format a multi-line summary of every PDU and DIMSE message sent and received, for its
    logger, which the node keeps at WARNING anyway (PDU dumps would show patient attributes): CPU spent on
    every instance for nothing. Warnings and errors are still logged. Call before any AE or server is made:
    the handlers are bound when an association or server is created.
    """
    from pynetdicom import _config

    if not hasattr(_config, "LOG_HANDLER_LEVEL"):
        raise RuntimeError("pynetdicom _config.LOG_HANDLER_LEVEL is gone: update node/receive.py")
    _config.LOG_HANDLER_LEVEL = "none"


def cache_uid_validation() -> None:
    """Remember pynetdicom's verdict on each UID it validates, process-wide, through its documented hook
    (``pynetdicom._config.VALIDATORS["UI"]``).

    Decoding one A-ASSOCIATE-RQ from dcmtk's storescu (128 presentation contexts) validates ~1,100 UIDs, almost
    all the same well-known SOP class and transfer syntax UIDs every time: 10-16 ms under the GIL per
    association on the CI CPU, 30 % less with the verdicts remembered (docs/benchmarks.md, "Node"). The
    verdict depends only on the value and ``ENFORCE_UID_CONFORMANCE``, which is part of the key; the cache is
    bounded. Call before any AE is made; calling again changes nothing.
    """
    import functools

    from pynetdicom import _config

    validators = getattr(_config, "VALIDATORS", None)
    if not isinstance(validators, dict) or "UI" not in validators:
        raise RuntimeError("pynetdicom _config.VALIDATORS['UI'] is gone: update node/receive.py")
    validate = validators["UI"]
    if getattr(validate, "_cached_by_node", False):
        return

    @functools.lru_cache(maxsize=4096)
    def verdict(value: str, enforce: bool) -> tuple[bool, str]:
        return validate(UID(value))

    def cached(value):
        if not isinstance(value, str):
            return validate(value)
        return verdict(str(value), bool(_config.ENFORCE_UID_CONFORMANCE))

    cached._cached_by_node = True
    validators["UI"] = cached


def install_wakeups(assoc) -> None:
    """Set an acceptor association (before its threads start) to wait instead of poll; see the docstring."""
    dul, dimse = assoc.dul, assoc.dimse
    for owner, name in ((dul, "_run_loop_delay"), (dul, "to_provider_queue"), (dul, "to_user_queue"),
                        (dul, "event_queue"), (dimse, "msg_queue"), (dul, "socket")):
        if not hasattr(owner, name):  # pynetdicom changed: fail loudly rather than poll silently
            raise RuntimeError(f"pynetdicom {type(owner).__name__}.{name} is gone: update node/receive.py")
    sock = dul.socket
    if not isinstance(sock, AssociationSocket):
        raise RuntimeError("pynetdicom's association has no AssociationSocket: update node/receive.py")
    if dul.to_provider_queue.qsize() or dul.to_user_queue.qsize() or dimse.msg_queue.qsize():
        raise RuntimeError("install_wakeups() must run before the association starts")
    sock.__class__ = WakingSocket
    sock._open_wake_pipe()
    dul.to_provider_queue = _WakingQueue(sock.wake)
    dimse.msg_queue = _WaitingQueue()
    dul.to_user_queue = _WakingQueue(dimse.msg_queue.poke)
    dul._run_loop_delay = 0


_SOP_INSTANCE_UID_ELEMENT = b"\x02\x00\x03\x00UI"  # (0002,0003) Media Storage SOP Instance UID, explicit VR LE


class FileHeaders:
    """The PS3.10 7.1 preamble, prefix and File Meta Information of a received instance, as bytes.

    The same elements pynetdicom's ``Event.file_meta`` / ``encoded_dataset()`` write (pynetdicom's implementation
    UID and version), encoded by pydicom once per (SOP Class, Transfer Syntax, SOP Instance UID length); for each
    instance only the UID's bytes change (every other value, the element lengths and the group length depend
    on nothing else). Building and encoding a ``FileMetaDataset`` per instance cost 0.4 ms of the receive
    path's CPU (docs/benchmarks.md, "Node"); this is a slice and a join of ~300 bytes. tests/test_node_receive.py
    checks the bytes against pynetdicom's own encoding for odd and even UID lengths.
    """

    def __init__(self) -> None:
        self._templates: dict[tuple[str, str, int], tuple[bytes, int]] = {}

    def header(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
        """``sop_instance`` must be a checked UID (digits and dots, at most 64 characters)."""
        uid = sop_instance.encode("ascii")
        key = (sop_class, transfer_syntax, len(uid))
        template = self._templates.get(key)
        if template is None:
            meta = encode_file_meta(create_file_meta(
                sop_class_uid=UID(sop_class), sop_instance_uid=UID("9" * len(uid)), transfer_syntax=UID(transfer_syntax)
            ))
            encoded = b"\0" * 128 + b"DICM" + meta
            at = encoded.index(_SOP_INSTANCE_UID_ELEMENT) + 8  # tag (4), VR (2), length (2), then the value
            template = self._templates[key] = (encoded, at)
        encoded, at = template
        return b"".join((encoded[:at], uid, encoded[at + len(uid):]))


class DurableWriter:
    """Atomic, durable instance files; folder fsyncs run by one syncer thread, beside the writers' own flushes.

    ``write(path, data)``: temporary file in the same folder (direct I/O: ``_write_direct``), rename,
    ``fdatasync`` (flush first when an earlier copy is replaced), and an fsync of the folder that started
    after the rename (PS3.4 B.2.3's Success means stored: on return the file and its name survive a crash or
    power loss). Each rename takes a ticket of its folder and wakes the syncer thread, which fsyncs every
    folder with renames not yet covered, while the writer flushes its own file: the two flushes overlap
    (measured on the CI disk: 3-5 ms instead of 9-11 ms in sequence), and one folder fsync covers every
    rename made before it started, for all concurrent associations (group commit). A new folder's own name
    is made durable once, when it is created.
    """

    def __init__(self, direct: bool = True) -> None:
        self._cond = threading.Condition()
        self._folders: dict[Path, _Folder] = {}
        self._syncer: threading.Thread | None = None
        # Direct I/O until the filesystem refuses it (tmpfs, some network filesystems): see _write_direct.
        self.direct = direct and bool(_O_DIRECT)
        self.direct_writes = 0  # files written with direct I/O (tests, bench/node.py)
        self._buffers = _AlignedBuffers()

    def write(self, path: Path, data: bytes | memoryview | list) -> None:
        """``data``: the file's bytes, or a list of buffers written one after the other (one ``writev``)."""
        folder = self._folder(path.parent)
        # unique per thread and process: several receiver processes may write a resent instance at once
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        # A copy already there was acknowledged: it must never be replaced by data that is not on disk yet.
        replacing = os.path.exists(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder was removed since we first saw it (an operator's purge)
            _make_durable_folder(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        renamed = False
        try:
            try:
                buffers = data if isinstance(data, list) else [data]
                if not (self.direct and self._write_direct(fd, buffers)):
                    _write_all(fd, buffers)
                if replacing:
                    os.fdatasync(fd)
                os.rename(tmp, path)
                renamed = True
                ticket = self._renamed(folder)
                if not replacing:
                    os.fdatasync(fd)  # meanwhile the syncer fsyncs the folder
            finally:
                os.close(fd)
            self._wait(folder, ticket)
        except BaseException:
            if not renamed:
                tmp.unlink(missing_ok=True)
            elif not replacing:  # never acknowledged: leave no file that is maybe not on disk
                path.unlink(missing_ok=True)
            raise

    def _write_direct(self, fd: int, buffers: list) -> bool:
        """Write ``buffers`` to the empty file ``fd`` with direct I/O; False: nothing written, write buffered.

        A buffered write copies the data into the page cache, where the kernel must first find (reclaim)
        pages for it: on the node that copy was 30 % of its CPU with 8 senders (perf, docs/benchmarks.md).
        A direct write (``O_DIRECT``) goes from one page-aligned buffer (copied into it here) to the disk.
        Offsets, lengths and the buffer are aligned to ``DIRECT_ALIGN``; the last partial block is written
        buffered after ``O_DIRECT`` is turned off on the descriptor, so the file never holds padding. The
        caller's ``fdatasync`` still follows: it makes the file's size and extents durable and flushes the
        disk's write cache, as for a buffered write.
        """
        total = sum(memoryview(b).nbytes for b in buffers)
        if not DIRECT_MIN <= total <= DIRECT_MAX:
            return False
        aligned = total - total % DIRECT_ALIGN
        buf = self._buffers.take(total)
        try:
            at = 0
            for b in buffers:
                n = memoryview(b).nbytes
                buf[at:at + n] = b
                at += n
            with memoryview(buf) as view:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                try:
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct = False  # this filesystem takes no direct I/O
                    return False
                done = 0
                try:
                    while done < aligned:
                        n = os.pwrite(fd, view[done:aligned], done)
                        done += n
                        if n <= 0 or n % DIRECT_ALIGN:  # short and unaligned: the rest goes buffered
                            break
                except OSError as exc:
                    if exc.errno != errno.EINVAL or done:
                        raise
                    self.direct = False  # the alignment is not enough for this device: buffered from now on
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
                direct = done
                while done < total:
                    done += os.pwrite(fd, view[done:total], done)
        finally:
            self._buffers.give(buf)
        self.direct_writes += bool(direct)
        return True

    def _folder(self, directory: Path) -> "_Folder":
        folder = self._folders.get(directory)
        if folder is None:
            with self._cond:
                folder = self._folders.get(directory)
                if folder is None:
                    _make_durable_folder(directory)
                    folder = self._folders[directory] = _Folder(directory)
                if self._syncer is None:
                    self._syncer = threading.Thread(target=self._sync_loop, name="folder-fsync", daemon=True)
                    self._syncer.start()
        return folder

    def _renamed(self, folder: "_Folder") -> int:
        with self._cond:
            folder.issued += 1
            self._cond.notify_all()
            return folder.issued

    def _wait(self, folder: "_Folder", ticket: int) -> None:
        with self._cond:
            while True:
                if folder.failed[0] <= ticket <= folder.failed[1]:
                    raise OSError(f"fsync of {folder.path} failed: {folder.error}")
                if folder.durable >= ticket:
                    return
                self._cond.wait()

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while not (dirty := [f for f in self._folders.values() if f.issued > f.durable]):
                    self._cond.wait()
                covered = [(f, f.durable + 1, f.issued) for f in dirty]
            for folder, first, last in covered:
                try:
                    _fsync_path(folder.path)
                    error = None
                except OSError as exc:
                    error = exc
                with self._cond:
                    folder.fsyncs += 1
                    if error is not None:  # the writers of these renames fail (their senders retry)
                        folder.failed, folder.error = (first, last), error
                    folder.durable = max(folder.durable, last)
                    self._cond.notify_all()


_O_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096  # offsets, lengths and memory of direct writes: any logical block size up to a page
DIRECT_MIN = 64 * 1024  # smaller files are written buffered: the page-cache copy is cheap, the aligned part small
DIRECT_MAX = 64 * 1024 * 1024  # larger ones too: no aligned copy that large is made


class _AlignedBuffers:
    """Page-aligned (``mmap``) buffers for direct writes, reused: a fresh one costs a page fault per 4 KB."""

    KEEP = 16  # at most this many idle buffers are kept (one per concurrent writer is what is used)
    KEEP_BYTES = 4 * 1024 * 1024  # ... each at most this large: a larger one (a big instance) is freed after use

    def __init__(self) -> None:
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._idle):
                if len(buf) >= size:
                    return self._idle.pop(i)
        return mmap.mmap(-1, -(-size // (1024 * 1024)) * 1024 * 1024)  # whole MB: fewer distinct sizes

    def give(self, buf: mmap.mmap) -> None:
        if len(buf) <= self.KEEP_BYTES:
            with self._lock:
                if len(self._idle) < self.KEEP:
                    self._idle.append(buf)
                    return
        buf.close()


class _Folder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.issued = 0  # tickets handed out (renames done)
        self.durable = 0  # every ticket up to this one is covered by a completed fsync
        self.failed = (1, 0)  # tickets whose folder fsync failed (empty range: none)
        self.error: OSError | None = None
        self.fsyncs = 0  # folder fsyncs run (tests/test_node_receive.py: fewer than renames when shared)


def _write_all(fd: int, buffers: list) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):  # a short write (a signal, a full disk) goes on where it stopped
            written -= len(views.pop(0))
        if views and written:
            views[0] = views[0][written:]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable_folder(directory: Path) -> None:
    """mkdir -p, then fsync the parent of every folder created, so the new names survive a power loss."""
    created = []
    here = directory
    while not here.is_dir():
        created.append(here)
        here = here.parent
    directory.mkdir(parents=True, exist_ok=True)
    for new in reversed(created):
        _fsync_path(new.parent)
