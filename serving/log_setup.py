"""The server's log lines: text for people (the default), or one JSON object a line for collectors.

`--log-format json` writes each record as {"time", "level", "logger", "message", "worker", "pid"}
plus "trace_id" and "span_id" when tracing is on and the record was logged inside a traced call,
and "exception" with the traceback where there is one: what Loki, Elasticsearch or Cloud Logging
parse without a pattern, and what joins a log line to its trace. `worker` is the --workers index
of the process (0 for a lone server; null for the parent of --workers, which serves no calls).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from serving import tracing

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped by JSON)."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "worker": self.worker,
            "pid": record.process,
        }
        if tracing.on:
            ids = tracing.current_ids()
            if ids is not None:
                entry["trace_id"], entry["span_id"] = ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["exception"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def text_format(worker: int | None) -> str:
    name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
    return f"%(asctime)s %(levelname)s {name}: %(message)s"


def configure(
    level: str, log_format: str = "text", worker: int | None = None, lone: bool = False
) -> None:
    """Send the root logger's records to stderr in `log_format`; replaces handlers set before.

    `worker`: the --workers index of this process; `lone`: a server without --workers (its
    JSON lines say worker 0, its text lines stay as they always were).
    """
    if log_format not in FORMATS:
        raise ValueError(f"--log-format must be text or json, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(0 if lone else worker))
    else:
        handler.setFormatter(logging.Formatter(text_format(worker)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python's warnings would go to stderr as bare text, breaking a JSON stream: log them instead.
    logging.captureWarnings(log_format == "json")
