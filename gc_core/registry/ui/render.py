"""Turning the dashboard's templates into responses: a sandboxed Jinja2 environment that
escapes everything, the filters the pages use, and the headers every page carries."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from fastapi.responses import HTMLResponse
from jinja2 import PackageLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

__all__ = ["SECURITY_HEADERS", "render"]

#: Pages run only the dashboard's own script and style, send forms only to the registry,
#: and are never framed nor cached: what one user saw stays out of shared caches.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _when(timestamp: float | None) -> str:
    """``2026-12-06 17:05:03 UTC``; a dash when there is no time."""
    if timestamp is None:
        return "—"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(timestamp: float | None) -> str:
    """``12s ago``; ``never`` when there is no time."""
    if timestamp is None:
        return "never"
    return f"{_span(max(0.0, time.time() - timestamp))} ago"


def _span(seconds: float | None) -> str:
    """A duration for people: ``0.042s``, ``12s``, ``3m 20s``, ``2h 05m``."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.3f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def _query(values: dict[str, Any]) -> str:
    """A query string of the values that are set."""
    return urlencode({key: value for key, value in values.items() if value not in (None, "")})


_environment = SandboxedEnvironment(
    loader=PackageLoader("gc_core.registry.ui", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_environment.filters.update(when=_when, ago=_ago, span=_span, query=_query)


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page from ``template`` with ``context``, carrying the security headers."""
    html = _environment.get_template(template).render(now=time.time(), **context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
