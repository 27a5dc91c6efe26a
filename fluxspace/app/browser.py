"""Driving the editor from outside, as a user does: `fluxspace app` in a subprocess, a real browser on it.

Used by the browser tests (tests/test_app_browser.py), the latency benchmark
(benchmarks/app_latency.py) and the README's screenshots. The browser is the system's Chromium
driven by Playwright (the Python package; its own browser download is not needed):

    with running_app(["--port", str(free_port())]) as url, chromium() as browser:
        page = browser.new_page()
        page.goto(url)
        wait_for_render(page)
        old = image_src(page, "#edited")
        move_slider(page, "#lambda-0", "ArrowLeft")
        wait_for_new_image(page, "#edited", old)

Every wait is on the page's state (an image's address, the status line), never a fixed sleep.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
READY = "fluxspace app: listening on "  # what `fluxspace app` prints once it accepts connections
STARTUP_S = 180.0  # loading flux-mini and Gradio takes seconds; a busy 2-core machine may need more


def chromium_path() -> str | None:
    """The system Chromium (FLUXSPACE_CHROMIUM wins), or None if this machine has none."""
    given = os.environ.get("FLUXSPACE_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def free_port() -> int:
    """A localhost port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(args: list[str], timeout: float = STARTUP_S) -> Iterator[str]:
    """`python -m fluxspace.cli app ARGS` until the block ends; yields its URL once it listens.

    The server's output is kept; if it exits or stays silent past `timeout`, the error shows it."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[2])  # this checkout's code, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    process = subprocess.Popen([sys.executable, "-m", "fluxspace.cli", "app", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if line.startswith(READY):
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait(timeout)
        url = next((line[len(READY) :].split()[0] for line in lines if line.startswith(READY)), None)
        if url is None:
            tail = "".join(lines[-20:])
            raise RuntimeError(f"fluxspace app did not start in {timeout:.0f} s (exit status {process.poll()}):\n{tail}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def chromium(executable: str | None = None):
    """A headless system Chromium under Playwright (needs the playwright package)."""
    from playwright.sync_api import sync_playwright

    executable = executable or chromium_path()
    if executable is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}; or set FLUXSPACE_CHROMIUM)")
    with sync_playwright() as p:
        # As root in a container: no sandbox, and /tmp instead of a small /dev/shm.
        args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        browser = p.chromium.launch(executable_path=executable, args=args)
        try:
            yield browser
        finally:
            browser.close()


# ----------------------------------------------------------------------------------------------
# The page's state (element ids are those of fluxspace/app/page.py)


def image_src(page, selector: str) -> str | None:
    """The address of the image an image box shows (None while it shows none)."""
    return page.evaluate("s => document.querySelector(s + ' img')?.getAttribute('src') ?? null", selector)


def wait_for_new_image(page, selector: str, old: str | None, timeout_ms: float = 60_000) -> str:
    """Wait until the image box shows an image other than `old`, loaded and drawn; returns its address."""
    page.wait_for_function(
        """([s, old]) => { const i = document.querySelector(s + ' img');
                           return i !== null && i.getAttribute('src') !== old && i.complete && i.naturalWidth > 0; }""",
        arg=[selector, old], timeout=timeout_ms, polling="raf",
    )  # fmt: skip
    return image_src(page, selector)


def status(page) -> str:
    return page.inner_text("#status").strip()


def wait_for_status(page, starts_with: str, timeout_ms: float = 60_000) -> str:
    """Wait until the status line starts with the given text; returns the line as it was then (read in the
    same check: a later request may change it before a second read)."""
    handle = page.wait_for_function(
        """t => { const s = document.querySelector('#status')?.innerText.trim();
                  return s !== undefined && s.startsWith(t) ? s : null; }""",
        arg=starts_with, timeout=timeout_ms,
    )  # fmt: skip
    return handle.json_value()


def wait_for_render(page, timeout_ms: float = 120_000) -> str:
    """The first render of a freshly loaded page (the page renders its example on load)."""
    wait_for_status(page, "edited in", timeout_ms)
    return wait_for_new_image(page, "#edited", None, timeout_ms)


def move_slider(page, selector: str, key: str = "ArrowRight", times: int = 1) -> float:
    """Move a slider by keyboard, one step per key press, as a user does; returns its new value."""
    handle = page.locator(f"{selector} input[type=range]")
    handle.focus()
    for _ in range(times):
        handle.press(key)
    return float(handle.input_value())


def set_text(page, selector: str, text: str) -> None:
    """Type into a text or number box and press Enter (which renders)."""
    box = page.locator(f"{selector} textarea, {selector} input").first
    box.fill(text)
    box.press("Enter")
