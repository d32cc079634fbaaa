"""Error answers that can always be rendered.

FastAPI's own 422 handler echoes each invalid value (``input``) back as JSON.  Some values
a request can carry have no JSON form: ``NaN`` and ``Infinity`` (Python's parser accepts
them, strict JSON rendering refuses them), strings with lone surrogates (``"\\ud800"`` is a
valid JSON escape but not encodable as UTF-8), raw bytes that are not UTF-8, integers
longer than Python will print.  Echoing one of those raised while rendering the 422, which
became a 500.  Here every echoed value is made JSON-safe first, and bounded (depth, items,
characters), so that a 900-deep or 20 000-item input is not sent back whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# What an echoed value keeps: enough to see what was wrong, never the whole of a big body.
MAX_ECHO_DEPTH = 4
MAX_ECHO_ITEMS = 16
MAX_ECHO_CHARS = 256
MAX_ERRORS = 100
TRUNCATED = "..."


def safe_text(text: str) -> str:
    """``text`` cut to ``MAX_ECHO_CHARS``, lone surrogates as ``\\udXXX`` escapes."""
    if len(text) > MAX_ECHO_CHARS:
        text = text[:MAX_ECHO_CHARS] + TRUNCATED
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_safe(value: Any, depth: int = 0) -> Any:
    """A bounded copy of ``value`` that strict JSON (no NaN, UTF-8) can always render."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Python refuses to print integers over 4300 digits (ValueError while rendering).
        return value if value.bit_length() <= 64 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, bytes | bytearray):
        return safe_text(bytes(value[: MAX_ECHO_CHARS + 1]).decode("utf-8", "backslashreplace"))
    if isinstance(value, Mapping):
        if depth >= MAX_ECHO_DEPTH:
            return "{...}"
        out: dict[str, Any] = {}
        for n, (key, item) in enumerate(value.items()):
            if n == MAX_ECHO_ITEMS:
                out[TRUNCATED] = f"{len(value) - n} more"
                break
            out[safe_text(str(key))] = json_safe(item, depth + 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        if depth >= MAX_ECHO_DEPTH:
            return "[...]"
        items = list(value)
        kept = [json_safe(v, depth + 1) for v in items[:MAX_ECHO_ITEMS]]
        return kept + [TRUNCATED] if len(items) > MAX_ECHO_ITEMS else kept
    try:  # anything else (an exception in ``ctx``, a custom object): its text
        return safe_text(str(value))
    except Exception:
        return f"<{type(value).__name__}>"


def safe_errors(errors: Any) -> list[Any]:
    """Pydantic's error list (``loc``, ``msg``, ``type``, ``input``, ``ctx``) made JSON-safe."""
    out = [json_safe(error, depth=-1) for error in list(errors)[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        out.append({"msg": f"{len(errors) - MAX_ERRORS} more errors", "type": "truncated"})
    return out


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 naming the fields, like FastAPI's own, but always renderable."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content={"detail": safe_errors(exc.errors())})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error_handler)
