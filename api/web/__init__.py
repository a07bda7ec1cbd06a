"""The one UI stack of the console and the status page: server-rendered Jinja2 pages,
htmx (vendored in `static/`, served from this origin) for partial updates, a little plain
JS and one stylesheet. No build step and nothing loaded from other hosts, so a fresh or
isolated machine serves the same pages the browser tests check.

Pages render with `templates.TemplateResponse(request, "name.html", context)` and extend
`base.html`; every HTML response carries `SECURITY_HEADERS` (a strict CSP: scripts and
styles only from this origin, so injected markup cannot run).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

__all__ = ["SECURITY_HEADERS", "STATIC_URL", "mount_static", "templates"]

HERE = Path(__file__).parent
STATIC_URL = "/static"

templates = Jinja2Templates(directory=HERE / "templates")

# Inline scripts and styles are refused: htmx is told not to inject its indicator style
# (base.html), and pages keep their JS in static files.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def mount_static(app: FastAPI) -> None:
    """Serve the stylesheet, htmx and page scripts from this origin."""
    app.mount(STATIC_URL, StaticFiles(directory=HERE / "static"), name="static")
