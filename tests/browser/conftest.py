"""Browser tests: Playwright (the pytest plugin) driving the system Chromium against pages
served by a real uvicorn on 127.0.0.1.

The sync Playwright API cannot run inside an event loop, so the server runs in a thread
with its own loop (`LiveServer`). Screenshots go to `test-results/screenshots/` (the
plugin's output folder); `axe_violations(page)` runs the vendored axe-core, which needs no
network and is evaluated through the DevTools protocol, so the page's CSP stays on.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
SCREENSHOTS = Path("test-results") / "screenshots"
SERIOUS = {"serious", "critical"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Browser tests run last: the sync Playwright driver keeps an event loop running in the
    main thread until the session ends, and pytest-asyncio cannot start one beside it."""
    browser = [item for item in items if "tests/browser/" in str(item.fspath)]
    if CHROMIUM is None:
        for item in browser:
            item.add_marker(pytest.mark.skip(reason="chromium is not installed (make test does)"))
    items[:] = [item for item in items if item not in browser] + browser


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """The system Chromium, quiet: no calls to its vendor's services from a closed network."""
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"],
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """`app` served by uvicorn on a free loopback port in a thread of its own."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the live server did not stop"


def shot(page: Page, name: str) -> Path:
    """A full-page screenshot in the tests' output folder; the path is returned."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def axe_violations(page: Page, impacts: set[str] = SERIOUS) -> list[dict[str, Any]]:
    """axe-core's violations of the given impacts on the page as it is now."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text() + "\n;0")
    result = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
    )
    found = [v for v in result if v.get("impact") in impacts]
    if found:
        print(json.dumps(found, indent=1)[:4000])
    return found


@pytest.fixture
def csp_errors(page: Page) -> list[str]:
    """Console messages that say the Content-Security-Policy refused something."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text
            else None)  # fmt: skip
    return errors
