"""Logging set-up: one JSON object per line (or plain text when asked), with the request id.

Everything a server process writes to stderr goes through the root logger's one handler: Python
warnings (a deprecation notice from a library would otherwise print two raw lines per request),
transformers' and huggingface_hub's own loggers (each ships a handler of its own that prints plain
text) and nothing from progress bars, which are turned off. This module does not know which
library warns about what; it only routes and de-duplicates.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import warnings
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_warned: set[tuple[str, str, int]] = set()
_MAX_DISTINCT_WARNINGS = 256  # a warning whose text changes every call must not grow this for ever


def printable(text: str, limit: int) -> str:
    """Client-sent text made safe for a log line: no control characters (no forged lines), bounded."""
    text = text[:limit]
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


_access = logging.getLogger("janus.access")


def log_access(method: str, path: str, status: int | str, seconds: float, error: str | None = None,
               **extra: Any) -> None:
    """One access log line, the same for REST and gRPC: "METHOD PATH STATUS 12.3ms[: error]", every part also a
    JSON field. `path` and `error` may come from the client: they are made printable and bounded here."""
    fields: dict[str, Any] = {"method": method, "path": printable(path, 200), "status": status,
                              "duration_ms": round(seconds * 1000, 1), **extra}
    line = f"{method} {fields['path']} {status} {fields['duration_ms']}ms"
    if error:
        fields["error"] = printable(error, 300)
        line += f": {fields['error']}"
    _access.info(line, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)  # structured extras, e.g. the access log's
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "info", json_lines: bool = True, model_libraries: bool = True) -> None:
    """One root handler for everything. `model_libraries`: also quiet transformers' and huggingface_hub's
    (which imports them); off in `janus-server api`, which never loads either."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.showwarning = _log_warning
    if model_libraries:
        quiet_libraries()


def quiet_libraries() -> None:
    """Progress bars off; transformers' and huggingface_hub's log records go to the root handler."""
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
    except ImportError:  # pragma: no cover - both are dependencies; an api-only image may trim them
        pass
    try:
        import huggingface_hub.utils.logging  # noqa: F401 - importing it is what adds its handler
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        hub = logging.getLogger("huggingface_hub")
        hub.handlers.clear()  # a plain StreamHandler: the root handler prints its records instead
        hub.propagate = True
    except ImportError:  # pragma: no cover
        pass


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` replacement: each distinct warning becomes one log record, once."""
    key = (category.__name__, str(message), lineno)
    if key in _warned:
        return
    if len(_warned) < _MAX_DISTINCT_WARNINGS:
        _warned.add(key)
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)
