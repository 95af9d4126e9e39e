"""Logging setup for `fastsfu serve`: human-readable text (the default) or one JSON object per line
(ts, level, logger, msg, plus the fields a call passes with `extra=`, e.g. user_id, remote, identifier).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup_logging(
    level: str = "info",
    fmt: str = "text",
    stream: TextIO | None = None,
    levels: Mapping[str, str] | None = None,
) -> None:
    """Configure the root logger (replacing earlier handlers) to write to `stream` (stderr), and
    each logger named in `levels` (a module or a package: fastsfu.dtls) to its own level."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, sub_level in (levels or {}).items():
        logging.getLogger(name).setLevel(sub_level.upper())
    # Python's warnings as records too, so that with json nothing else reaches stderr.
    logging.captureWarnings(fmt == "json")


def parse_levels(text: str) -> tuple[str | None, dict[str, str]]:
    """`info`, `fastsfu.dtls=debug` or both, comma-separated: the root level (None if not given)
    and the levels by logger name. ValueError names what is wrong."""
    root: str | None = None
    levels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.rpartition("=")
        value = value.strip().lower()
        if value not in LEVELS:
            raise ValueError(f"must be one of {', '.join(LEVELS)}, got {value!r}")
        if not sep:
            root = value
        elif not name.strip() or any(not part.isidentifier() for part in name.strip().split(".")):
            raise ValueError(f"not a logger name: {name!r}")
        else:
            levels[name.strip()] = value
    return root, levels


def announce(log: logging.Logger, fmt: str, text: str, **fields: Any) -> None:
    """A start-up line: on stdout as `fastsfu: <text>` (users and scripts read these), or with the
    json format an info record of `log` carrying `fields`, so that every output line is JSON.
    Either way it shows at any log level, as the address of a service must."""
    if fmt == "json":
        log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, text, (), None, extra=fields))
    else:
        # One write per line (print writes the text and its newline apart): workers of one
        # supervisor share its stdout, and a pipe keeps a write of up to PIPE_BUF bytes whole.
        sys.stdout.write(f"fastsfu: {text}\n")
        sys.stdout.flush()
