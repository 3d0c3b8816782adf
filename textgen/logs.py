"""Log lines as JSON (one object per line, for a log shipper) or as text, for every logger of
the process: textgen's, the libraries', and gunicorn's (gunicorn.conf.py uses the same
formatter)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

# What a record carries beyond its message: a request log's fields (log.info(..., extra=...)).
FIELDS = "fields"


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", ...the record's fields, "exception"}."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


TEXT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def formatter(kind: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else logging.Formatter(TEXT)


def configure_logging(level: str, kind: str) -> None:
    """The root logger at ``level``, writing ``kind`` lines to stderr (once per process: when
    the root logger has a handler already, pytest's say, that one is left as it is)."""
    root = logging.getLogger()
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter(kind))
        root.addHandler(handler)
