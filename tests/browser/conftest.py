"""Browser tests: Debian's headless Chromium (/usr/bin/chromium) driven by Playwright.

The browser is the system's; `playwright install` is never run (scripts/bootstrap.sh
installs Debian's chromium when it is missing). Pages are served by the test
cluster's real gateways. Screenshots go to test-artifacts/screenshots/.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.harness import ROOT, Gateway, Process, gateway_command, wait_until

CHROMIUM = os.environ.get("NETHERLINK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
PASSWORD = "correct-horse"  # tests.harness.register_and_login's


@pytest.fixture(scope="session")
def playwright_driver():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/bootstrap.sh installs Debian's chromium "
                    "(apt-get install -y chromium chromium-driver)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=20_000)
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright_driver):
    b = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


@pytest.fixture
def shot(request):
    """shot(page, name): a screenshot in test-artifacts/screenshots/<test>-<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    test = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]

    def _shot(page, name: str) -> Path:
        path = SCREENSHOTS / f"{test}-{name}.png"
        page.screenshot(path=str(path), full_page=False)
        return path

    return _shot


class PageErrors:
    """JavaScript errors and dialogs (alert/confirm) seen by a page: a test asserts there are none."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog):
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()


@pytest.fixture
def open_page(browser):
    """open_page(base_url, width=1100, height=760, before=None) -> page in a fresh browser context (its own
    storage); `before(page)` runs before the page loads (to set up routes)."""
    contexts = []

    def _open(base_url: str, width: int = 1100, height: int = 760, before=None):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.errors = PageErrors(page)
        if before is not None:
            before(page)
        page.goto(base_url + "/")
        return page

    yield _open
    for context in contexts:
        context.close()


def log_in(page, username: str, password: str = PASSWORD) -> None:
    """Log in through the page's form and wait until the socket is open."""
    from playwright.sync_api import expect

    page.locator("#auth-form input[name=username]").fill(username)
    page.locator("#auth-form input[name=password]").fill(password)
    page.locator("#auth-submit").click()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")


def start_chat(page, username: str) -> None:
    from playwright.sync_api import expect

    page.locator("#new-chat input[name=username]").fill(username)
    page.locator("#new-chat button[type=submit]").click()
    expect(page.locator("#conv-title")).to_have_text(username)


def send(page, text: str) -> None:
    page.locator("#composer textarea").fill(text)
    page.locator("#composer textarea").press("Enter")


def conv_item(page, conversation_id: str):
    return page.locator(f'li.conv[data-conversation-id="{conversation_id}"]')


def bubbles(page, text: str):
    """The message rows whose text is exactly `text`."""
    return page.locator("#message-list li.msg").filter(has=page.locator(".text", has_text=re.compile(
        "^" + re.escape(text) + "$")))


class PinnedGateway(Gateway):
    """A gateway on a port the test chooses, so it can be stopped and started again at the same address."""

    def __init__(self, gateway_id: str, port: int, services, log_dir, **env):
        self.port = port
        self.gateway_id = gateway_id
        Process.__init__(self, f"gateway-{gateway_id}", gateway_command(port),
                         services.env(GATEWAY_ID=gateway_id, GATEWAY_PORT=str(port), **env), log_dir)
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/ws"
        wait_until(self._healthy, timeout=30, what=f"gateway {gateway_id} health")
