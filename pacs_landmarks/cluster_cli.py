"""``pacs-landmarks worker``: a long-lived worker process of the distributed mode (docs/scale-out.md).

    pacs-landmarks worker --config node.toml --queues analyse-stat,analyse --device cuda:0
    pacs-landmarks worker --config node.toml --queues deliver

An analysis worker loads and warms the model once, then takes jobs from PostgreSQL (procrastinate) until
SIGTERM; a delivery worker needs no model, so an archive that is down never holds a GPU. The 2D model of
cephalogram (image) jobs (``--ceph-model``, node.toml ``ceph_model``; default the shipped ceph19 model) is
loaded at the first image job, once per process, or at start with ``--warm-ceph``.
"""
from __future__ import annotations

import argparse

from pacs_landmarks.errors import CommandError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="distributed mode: run a worker (analysis with a warm model, or delivery) on the PostgreSQL queue",
        description=(
            "Run one worker of the distributed mode: take jobs from the PostgreSQL queue (procrastinate), read "
            "each series by reference (WADO-RS or the shared spool), run the landmark pipeline with a model "
            "loaded once, and deliver the results (STOW-RS, C-STORE or a folder) on the deliver queue. Settings "
            "come from --config (node.toml: dsn, storage, [cluster]); the options below override them."
        ),
    )
    p.add_argument("--config", metavar="TOML", help="node.toml with dsn, storage (shared results) and [cluster]")
    p.add_argument("--dsn", help="PostgreSQL connection string (overrides the config's dsn)")
    p.add_argument("--storage", metavar="DIR", help="shared storage; results go to DIR/results")
    p.add_argument("--queues", default="analyse-stat,analyse",
                   help="comma-separated: analyse-stat, analyse, deliver (default analyse-stat,analyse)")
    p.add_argument("--model", help="model file (default: the shipped demo model)")
    p.add_argument("--ceph-model", metavar="FILE",
                   help="2D model of cephalogram jobs (default: the config's ceph_model, else the shipped ceph19)")
    p.add_argument("--warm-ceph", action="store_true",
                   help="load the cephalogram model at start, not at the first image job")
    p.add_argument("--device", help="torch device, e.g. cpu, cuda:0")
    p.add_argument("--name", help="worker name shown by `jobs` (default host-pid-random)")
    p.add_argument("--log-format", choices=("text", "json"), help="one line per event, as text or JSON")
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    from pacs_landmarks.jobs import logs
    from pacs_landmarks.node.cli import effective_config

    if args.dsn:
        args.queue = "postgres"
    cfg = effective_config(args)
    if not cfg.dsn:
        raise CommandError("no PostgreSQL: give --dsn or a config with dsn")
    logs.configure(cfg.log_format, getattr(args, "verbose", False))
    import logging

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one line per copied module per job otherwise
    from pacs_landmarks.jobs.distributed import ANALYSE, ANALYSE_STAT, run_worker
    from pacs_landmarks.jobs.references import DeliverByDestination, load_reference

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    model = None
    if {ANALYSE, ANALYSE_STAT} & set(queues):
        from pacs_landmarks.node.app import ModelLoadError, load_model

        try:
            model = load_model(cfg.model, cfg.device)
        except ModelLoadError as exc:
            raise CommandError(str(exc)) from None
    import functools

    settings = cfg.cluster_settings()
    from pacs_landmarks.node.app import load_model as load

    image_model_loader = functools.partial(load, cfg.ceph_model, cfg.device, landmark_set="ceph19")
    try:
        run_worker(settings, queues, model=model,
                   loader=functools.partial(load_reference, retry_s=settings.source_retry_s),
                   deliver=DeliverByDestination(cfg.ae_title), name=args.name,
                   image_model_loader=image_model_loader, warm_image_model=args.warm_ceph)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return 0
