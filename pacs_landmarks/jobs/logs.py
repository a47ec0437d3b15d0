"""One log line per event, as text (``event key=value ...``) or JSON (``--log-format json``).

Only UIDs, AE titles, addresses, counts and times go into events: never patient names or IDs.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER = logging.getLogger("pacs_landmarks.node")


def log_event(event: str, level: int = logging.INFO, logger: logging.Logger = LOGGER, **fields: Any) -> None:
    """Log one event; ``fields`` become ``key=value`` pairs (text) or JSON members."""
    text = " ".join([event] + [f"{k}={_text(v)}" for k, v in fields.items() if v is not None])
    logger.log(level, text, extra={"event": event, "fields": fields})


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    value = str(value)
    return json.dumps(value) if (" " in value or not value) else value


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "event", ...fields}`` per line; plain records get ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if hasattr(record, "event"):
            out["event"] = record.event
            out.update({k: v for k, v in record.fields.items() if v is not None})
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str = "text", verbose: bool = False) -> None:
    """Send every log record to stderr, one line each, in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # pynetdicom logs every PDU at INFO/DEBUG, with patient attributes in dumps: keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
