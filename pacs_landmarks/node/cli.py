"""``pacs-landmarks serve`` (the standalone DICOM node) and ``pacs-landmarks jobs`` (its job list)."""
from __future__ import annotations

import argparse
import json
import time

from pacs_landmarks.errors import CommandError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", help="node settings file (see the example node.toml)")
    p.add_argument("--storage", metavar="DIR", help="storage directory: received series, results, jobs.sqlite")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``jobs``; their heavy imports happen inside the handlers."""
    p = sub.add_parser(
        "serve",
        help="run the DICOM node: receive CT series, find landmarks, C-STORE SR + SEG to destinations",
        description=(
            "Run the standalone DICOM node: a Verification and Storage SCP that receives CT series, completes "
            "each series (association closed + idle timeout, or expected count reached), runs the landmark "
            "cascade in a durable job queue and C-STOREs the landmark SR, measurements SR and SEG to every "
            "destination, retrying while a destination is down. Settings come from --config (TOML) and are "
            "overridden by the options below."
        ),
    )
    _add_config_args(p)
    p.add_argument("--ae-title", help="our AE title (default LANDMARKS)")
    p.add_argument("--bind", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 11112; 0 = any free port)")
    p.add_argument("--allow-ae", action="append", metavar="AET[@ADDR,...]",
                   help="calling AE title allowed to associate, optionally only from these addresses (repeatable)")
    p.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                   help="where results are C-STOREd (repeatable)")
    p.add_argument("--receivers", type=int, metavar="N",
                   help="processes that receive associations (default: one per CPU core, at most 4)")
    p.add_argument("--idle-timeout", type=float, metavar="S",
                   help="seconds without a new instance after the association closed before a series is complete")
    p.add_argument("--model", help="model file (default: the shipped demo model)")
    p.add_argument("--ceph-model", help="2D model file for lateral cephalograms (default: the shipped ceph19 model)")
    p.add_argument("--device", help="torch device for inference, e.g. cpu or cuda")
    p.add_argument("--tls-cert", help="DICOM TLS: our certificate (PEM)")
    p.add_argument("--tls-key", help="DICOM TLS: our private key (PEM)")
    p.add_argument("--tls-ca", help="DICOM TLS: CA (PEM) that must have signed client certificates")
    p.add_argument("--log-format", choices=("text", "json"), help="one line per event, as text or JSON")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "jobs",
        help="list the node's jobs, or retry one",
        description=(
            "List the jobs of a node's storage directory (newest first: state, series UID, attempts, reason), "
            "or `jobs [--storage DIR] retry ID` to run a failed/done job again or to deliver a waiting job now."
        ),
    )
    _add_config_args(p)
    p.add_argument("--dsn", help="the distributed mode's PostgreSQL: list the cluster's jobs (every node, worker)")
    p.add_argument("--json", action="store_true", help="machine-readable output (one JSON array)")
    p.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    actions = p.add_subparsers(dest="jobs_action", metavar="ACTION")
    r = actions.add_parser("retry", help="re-queue a job", description="Re-queue a failed or done job, or "
                           "deliver a job waiting for a destination now.")
    r.add_argument("job_id", type=int, metavar="ID")
    p.set_defaults(func=_jobs)


def effective_config(args: argparse.Namespace):
    """node.toml (if any) overridden by the command line, checked."""
    from pacs_landmarks.node import config as config_mod

    try:
        cfg = config_mod.load(getattr(args, "config", None))
        for key in ("ae_title", "bind", "port", "storage", "idle_timeout", "model", "ceph_model", "device", "log_format",
                    "receivers", "tls_cert", "tls_key", "tls_ca", "queue", "dsn"):
            value = getattr(args, key, None)
            if value is not None:
                setattr(cfg, key, value)
        if getattr(args, "allow_ae", None):
            cfg.allow = [config_mod.AllowedCaller.parse(a) for a in args.allow_ae]
        if getattr(args, "destination", None):
            cfg.destinations = [config_mod.Destination.parse(d) for d in args.destination]
        return cfg.checked()
    except config_mod.ConfigError as exc:
        raise CommandError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pacs_landmarks.jobs import logs
    from pacs_landmarks.node.app import ModelLoadError, Node
    from pacs_landmarks.node.receivers import ReceiverStartError

    cfg = effective_config(args)
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    logs.configure(cfg.log_format, getattr(args, "verbose", False))
    node = Node(cfg)
    try:
        node.start()
    except (ModelLoadError, ReceiverStartError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot listen on {cfg.bind}:{cfg.port}: {exc.strerror or exc}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    node.stop()
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from pacs_landmarks.jobs.store import JobStateError, JobStore

    if getattr(args, "dsn", None):
        args.queue = "postgres"
    cfg = effective_config(args)
    if cfg.queue == "postgres":  # the cluster's jobs, whichever node or Orthanc queued them
        from pacs_landmarks.jobs.pgstore import PgJobStore

        store = PgJobStore(cfg.dsn)
    else:
        path = cfg.storage_path / "jobs.sqlite"
        if not path.exists():
            raise CommandError(f"no job store at {path} (use --storage or --config)")
        store = JobStore(path)
    if args.jobs_action == "retry":
        try:
            job = store.retry(args.job_id)
        except JobStateError as exc:
            raise CommandError(str(exc)) from None
        print(f"job {job.id}: {job.state}")
        return 0
    jobs = store.list(args.state)
    if args.json:
        print(json.dumps([{**j.to_json(), "worker": j.owner or j.details.get("worker")} for j in jobs], indent=2))
        return 0
    print(f"{'ID':>5}  {'STATE':<10}  {'CREATED (UTC)':<19}  {'N':>4}  {'TRY':>3}  {'WAIT s':>6}  {'RUN s':>6}  "
          f"{'WORKER':<20}  SERIES / REASON")
    for j in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j.created_at))
        wait = j.timings.get("queue_wait")
        run = sum(j.timings.get(k, 0.0) for k in ("read", "volume", "cascade", "outputs", "write_results"))
        worker = (j.owner or j.details.get("worker") or "-")[:20]
        line = (f"{j.id:>5}  {j.state:<10}  {created}  {j.instances:>4}  {j.attempts:>3}  "
                f"{'-' if wait is None else f'{wait:.2f}':>6}  {f'{run:.2f}' if run else '-':>6}  {worker:<20}  "
                f"{j.series_instance_uid}")
        if j.reason:
            line += f"  ({j.reason})"
        print(line)
    return 0
