"""The browser tests' fixtures: a materialized cohort, the daemon and webserver over it, and headless
Debian Chromium driven by Playwright (never a browser Playwright downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gcmlm_assets_tests.support.ui.cockpit import (
    SCREENSHOTS, build_cohort, start_cohort_daemon, start_webserver, stop_sensors,
)
from gcmlm_assets_tests.support.ui.onboarding import dismiss_onboarding, suppress_onboarding

CHROMIUM = Path(os.environ.get("GCMLM_CHROMIUM", "/usr/bin/chromium"))
# Flags for a sandboxed machine without a network: no background connections, no GPU, no sandbox as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def _missing(what: str) -> None:
    message = f"{what}; the browser tests need Debian's chromium package and the playwright Python package"
    if os.environ.get("GCMLM_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def cockpit(tmp_path_factory, test_data):
    """The cohort, with dagster-daemon and dagster-webserver running over it; both stopped by pid."""
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} not found")
    root = tmp_path_factory.mktemp("cockpit")
    cohort = build_cohort(root)
    stop_sensors(cohort)
    daemon = start_cohort_daemon(cohort)
    try:
        server = start_webserver(cohort, root / "webserver.log")
    except BaseException:
        daemon.stop()
        raise
    try:
        yield cohort, server, daemon
    finally:
        server.stop()
        daemon.stop()
        assert server.process.returncode is not None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} not found")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def ui(cockpit, browser, request):
    """A fresh page; `ui.open(path)` loads a page of the webserver. A screenshot is kept per test."""
    _, server, _ = cockpit
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    # Dagster's "Join the Dagster community" dialog would open over any page (see onboarding.py).
    suppress_onboarding(context)
    page = context.new_page()
    dismiss_onboarding(page)
    page.set_default_timeout(30_000)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def open_page(path: str):
        page.goto(server.url + path)
        page.wait_for_load_state("networkidle")
        return page

    page.open = open_page
    yield page
    page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"))
    context.close()

