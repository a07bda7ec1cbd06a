"""The shared UI stack in Chromium: the base page loads its stylesheet and the vendored
htmx from this origin under the strict CSP, passes axe-core and fits a 375 px screen."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from playwright.sync_api import Page

from api import web
from tests.browser.conftest import LiveServer, axe_violations, shot


def stack_app() -> FastAPI:
    app = FastAPI()
    web.mount_static(app)

    @app.get("/probe", response_class=HTMLResponse)
    async def probe(request: Request) -> HTMLResponse:
        response = web.templates.TemplateResponse(request, "base.html", {})
        response.headers.update(web.SECURITY_HEADERS)
        return response

    return app


def test_base_page_loads_htmx_and_css_under_the_csp(page: Page, csp_errors: list[str]) -> None:
    with LiveServer(stack_app()) as server:
        page.set_viewport_size({"width": 375, "height": 700})
        response = page.goto(f"{server.url}/probe")
        assert response is not None
        assert response.ok
        assert "script-src 'self'" in response.headers["content-security-policy"]
        page.wait_for_function("() => window.htmx !== undefined", timeout=5000)
        assert page.evaluate("() => htmx.config.includeIndicatorStyles") is False
        # the stylesheet applied: the header has its dark background
        background = page.evaluate(
            "() => getComputedStyle(document.querySelector('header.top')).backgroundColor"
        )
        assert background == "rgb(22, 32, 44)"
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
        assert axe_violations(page) == []
        assert csp_errors == []
        shot(page, "web-stack-base")


def test_an_inline_script_is_refused(page: Page, csp_errors: list[str]) -> None:
    """The CSP is what makes an injected `<script>` harmless; prove it bites."""
    app = stack_app()

    @app.get("/inline", response_class=HTMLResponse)
    async def inline() -> HTMLResponse:
        return HTMLResponse("<!doctype html><title>t</title><script>window.ran = 1</script>",
                            headers=web.SECURITY_HEADERS)  # fmt: skip

    with LiveServer(app) as server:
        page.goto(f"{server.url}/inline")
        assert page.evaluate("() => window.ran === undefined")
        assert csp_errors, "the browser did not report the refused script"
