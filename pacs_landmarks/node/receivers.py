"""Receiver processes: the node's associations run in a pool of processes behind one listening socket.

pynetdicom runs each association in Python threads of its own (a DUL thread and an association thread). In one
process those threads take turns on one interpreter lock: with 8 concurrent senders the node could not use a
second core, while Orthanc's C++ threads did (docs/benchmarks.md, "Node"). So:

- the node's main process listens (``bind``/``port``) and accepts each connection, sets TCP_NODELAY (DIMSE is
  request/response: Nagle's algorithm would hold back the last small segment of every PDU) and passes the
  socket (SCM_RIGHTS, ``socket.send_fds``) to the receiver process with the fewest open connections;
- a receiver process (``python -m pacs_landmarks.node.receivers``, started with ``subprocess``: no fork of a
  process that has threads and a model loaded) runs pynetdicom on the connections it is given
  (``scp.StorageSCP``): checks, writes durably, and reports each instance to the main process over a pipe
  (``multiprocessing.connection``), *waiting for the answer before its Success*; the main process' intake
  (intake.py) owns the job store and the series' completion, as one process for every receiver;
- ``max_associations`` counts the associations of all receivers: a receiver asks the main process to admit each
  association request, and rejects one over the limit (A-ASSOCIATE-RJ, rejected-transient,
  local-limit-exceeded: PS3.8 9.3.4). A connection that never sends a request (a port probe) takes no slot;
- a receiver that dies (killed, out of memory) is started again; its associations count as aborted (their
  series complete after the idle timeout) and their senders retry what was not acknowledged. When the node
  stops or dies, its receivers see the hand-over socket close, abort what is open and exit.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.node.config import NodeConfig

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
STARTUP_S = 60.0  # a receiver imports pydicom and pynetdicom: ~0.5 s, longer on a loaded machine
RESTART_DELAY_S = 1.0  # a receiver that dies is started again after this (no busy loop if it cannot run)


def default_receivers() -> int:
    """One receiver process per core, at most 4 (pynetdicom's receive path is ~2-4 ms of CPU per instance)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class ReceiverStartError(Exception):
    """A receiver process did not start (the node does not start)."""


class _Receiver:
    """The main process' handle on one receiver process (started at once; it waits for its settings)."""

    def __init__(self, index: int):
        self.index = index
        hand_over, theirs_fd = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rpc, theirs_rpc = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_landmarks.node.receivers", str(theirs_fd.fileno()), str(theirs_rpc.fileno())],
            pass_fds=(theirs_fd.fileno(), theirs_rpc.fileno()), env=env, stdin=subprocess.DEVNULL,
        )
        theirs_fd.close()
        theirs_rpc.close()
        self.hand_over = hand_over
        self.rpc = Connection(rpc.detach())
        self.ready = threading.Event()  # set when the receiver reports that it runs
        self.open = 0  # connections handed over and not yet closed
        self.handed = 0  # connections handed over in all
        self.admitted: set[tuple] = set()  # associations admitted under max_associations, not yet ended


class ReceiverPool:
    """The listening socket and the receiver processes; ``intake`` (intake.Intake) takes their reports.

    ``spawn()`` starts the processes (they import their libraries meanwhile: call it early), ``start()`` gives
    them their settings, waits until they run and then listens.
    """

    def __init__(self, cfg: NodeConfig, processes: int | None = None, verbose: bool = False):
        self.cfg = cfg
        self.processes = processes or cfg.receivers or default_receivers()
        self.verbose = verbose
        self.image_jobs = False
        self.intake = None
        self._receivers: list[_Receiver] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self.listener: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    def spawn(self) -> None:
        self._receivers = [_Receiver(index) for index in range(self.processes)]

    def start(self, intake, image_jobs: bool) -> tuple[str, int]:
        """Start taking connections; ``image_jobs``: X-ray images start image jobs (a 2D model is there).
        Returns the address listened on."""
        self.intake, self.image_jobs = intake, image_jobs
        family = socket.AF_INET6 if ":" in self.cfg.bind else socket.AF_INET
        self.listener = socket.create_server((self.cfg.bind, int(self.cfg.port)), family=family,
                                             backlog=max(16, 2 * self.cfg.max_associations))
        self.address = self.listener.getsockname()[:2]
        if not self._receivers:
            self.spawn()
        for r in self._receivers:
            self._run(r)
        deadline = time.monotonic() + STARTUP_S
        for r in list(self._receivers):
            while not r.ready.wait(0.1):
                if r.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ReceiverStartError(f"receiver process {r.index} did not start (exit code {r.proc.poll()}; "
                                             "its error is in the log above)")
        accept = threading.Thread(target=self._accept_loop, name="dicom-listener", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        os.write(self._wake_w, b"\0")
        with self._lock:
            receivers = list(self._receivers)
        for r in receivers:
            r.hand_over.close()  # the receiver aborts what is open and exits
        for r in receivers:
            try:
                r.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
        for t in self._threads:
            t.join(timeout)
        if self.listener is not None:
            self.listener.close()

    # -- main process side ---------------------------------------------------------------------------------
    def _run(self, r: _Receiver) -> None:
        """Send a receiver its settings and answer its reports from now on."""
        try:
            r.rpc.send((self.cfg, self.image_jobs, self.address, self.verbose, r.index))
        except OSError:  # it died already: its answer loop sees that and says so
            pass
        t = threading.Thread(target=self._answer_loop, args=(r,), name=f"receiver-{r.index}", daemon=True)
        t.start()
        self._threads.append(t)
        log_event("receiver.started", receiver=r.index, pid=r.proc.pid)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            readable, _, _ = select.select([self.listener, self._wake_r], [], [])
            if self._wake_r in readable:
                return
            try:
                conn, address = self.listener.accept()
            except OSError as exc:  # e.g. the peer reset before accept, or out of descriptors
                log_event("connection.failed", logging.WARNING, reason=exc.strerror or type(exc).__name__)
                continue
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._hand_over(conn, address)

    def _hand_over(self, conn: socket.socket, address: tuple) -> None:
        with self._lock:
            candidates = sorted(self._receivers, key=lambda r: (r.open, r.handed))
        for r in candidates:
            message = json.dumps([address[0], address[1]]).encode()
            try:
                socket.send_fds(r.hand_over, [message], [conn.fileno()])
            except OSError:  # that receiver is gone (being restarted): the next one takes it
                continue
            with self._lock:
                r.open += 1
                r.handed += 1
            return
        log_event("connection.dropped", logging.ERROR, address=address[0], reason="no receiver process running")

    def _answer_loop(self, r: _Receiver) -> None:
        """Answer one receiver's reports, in order, until it exits."""
        while True:
            try:
                message = r.rpc.recv()
            except (EOFError, OSError):
                break
            try:
                answer = self._answer(r, message)
            except Exception as exc:  # the job store failed: the receiver refuses the instance (0xA700)
                logging.getLogger(__name__).exception("intake failed for a report of receiver %s", r.index)
                answer = ("error", f"{type(exc).__name__}: {exc}")
            try:
                r.rpc.send(answer)
            except OSError:
                break
        self._ended(r)

    def _answer(self, r: _Receiver, message: tuple) -> tuple:
        kind = message[0]
        if kind == "store":
            _, key, item = message
            self.intake.stored(key, item)
        elif kind == "admit":  # an association request: within max_associations over every receiver?
            with self._lock:
                if sum(len(x.admitted) for x in self._receivers) >= self.cfg.max_associations:
                    return ("ok", False)
                r.admitted.add(message[1])
            return ("ok", True)
        elif kind == "end":  # a connection closed (each one handed over ends so; a probe at the ACSE timeout)
            _, key, aborted = message
            with self._lock:
                r.open -= 1
                r.admitted.discard(key)
            self.intake.closed(key, aborted)
        elif kind == "aborted":
            self.intake.closed(message[1], True)
        elif kind == "ready":
            r.ready.set()
        elif kind == "gone":  # the connection ended before an association started (e.g. a failed TLS handshake)
            with self._lock:
                r.open -= 1
        return ("ok",)

    def _ended(self, r: _Receiver) -> None:
        r.rpc.close()
        code = r.proc.wait()
        with self._lock:  # its open associations count as aborted: their series complete after the idle timeout
            ended, r.admitted = r.admitted, set()
        for key in ended:
            self.intake.closed(key, True)
        if self._stopping.is_set() or not r.ready.is_set():  # one that cannot start is not started again
            return
        log_event("receiver.died", logging.ERROR, receiver=r.index, pid=r.proc.pid, exit_code=code,
                  open_associations=r.open)
        r.hand_over.close()
        if not self._stopping.wait(RESTART_DELAY_S):
            new = _Receiver(r.index)
            with self._lock:
                self._receivers[r.index] = new
            self._run(new)


# -- receiver process side ---------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    """A receiver process: ``argv`` = the hand-over socket's and the report pipe's descriptors."""
    from pacs_landmarks.jobs import logs
    from pacs_landmarks.node.scp import StorageSCP  # imported while the node loads its models

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops us
    hand_over = socket.socket(fileno=int(argv[0]))
    rpc = Connection(int(argv[1]))
    cfg, image_jobs, address, verbose, index = rpc.recv()
    logs.configure(cfg.log_format, verbose)
    lock = threading.Lock()

    def report(message: tuple) -> tuple:
        with lock:  # one report at a time, each with its answer
            try:
                rpc.send(message)
                return rpc.recv()
            except (EOFError, OSError) as exc:  # the node is gone
                return ("error", f"node main process unreachable ({type(exc).__name__})")

    scp = StorageSCP(cfg, report, image_jobs, index)
    server = scp.host(tuple(address))

    def gone(request, client_address) -> None:
        log_event("connection.failed", logging.WARNING, address=client_address[0], reason="no association")
        report(("gone",))

    server.handle_error = gone
    report(("ready",))
    gc.freeze()  # what is loaded now lives as long as the process: keep it out of the collector's scans
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(hand_over, 1024, 1)
        except OSError:
            break
        if not fds:  # the node closed the hand-over socket: it is stopping (or gone)
            break
        host, port = json.loads(message)
        server.serve(socket.socket(fileno=fds[0]), (host, port))
    scp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
