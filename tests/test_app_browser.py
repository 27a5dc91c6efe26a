"""The editor in a real browser: `fluxspace app` on flux-mini in a subprocess, Debian's Chromium driven by
Playwright. A user's path through the page: move the lambda slider and see the edit change, download
the PNG and find the slider's value in it, toggle the masks, drop the PNG back to restore its settings,
upload a render and take it through inversion, mistype and read the message, and carry on.

With FLUXSPACE_SCREENSHOTS=FOLDER the tests also save the README's screenshots there (docs/app).
"""

import json
import os
import re
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
pytest.importorskip("playwright", reason="playwright is not installed (pip install -e '.[dev]')")

from fluxspace.app.browser import (  # noqa: E402
    chromium,
    chromium_path,
    free_port,
    image_src,
    move_slider,
    running_app,
    set_text,
    wait_for_new_image,
    wait_for_render,
    wait_for_status,
)
from fluxspace.images import read_png_params  # noqa: E402

if chromium_path() is None:
    pytest.skip("no system Chromium (apt-get install chromium; .ci/run installs it)", allow_module_level=True)

STEPS = "6"  # few steps: each render takes a fraction of a second on flux-mini
SHOTS = os.environ.get("FLUXSPACE_SCREENSHOTS")


@pytest.fixture(scope="module")
def url():
    with running_app(["--port", str(free_port())]) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, url):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url)
    wait_for_render(page)
    old = image_src(page, "#edited")
    set_text(page, "#steps", STEPS)
    wait_for_new_image(page, "#edited", old)
    wait_for_status(page, f"edited in {STEPS} steps")
    yield page
    context.close()


def fetch(page, src: str) -> np.ndarray:
    """The pixels of an image the page shows, fetched as the browser got them."""
    return np.asarray(Image.open(BytesIO(page.request.get(src).body())).convert("RGB"))


def download(page, box: str, name: str, folder: Path) -> Path:
    """Click a file box's download link, as a user does; the saved file."""
    with page.expect_download() as d:
        page.locator(f"{box} a[download='{name}']").click()
    path = folder / name
    d.value.save_as(path)
    return path


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


def test_slider_renders_a_new_edit_and_the_download_records_it(page, tmp_path):
    before_src = image_src(page, "#edited")
    before = fetch(page, before_src)
    original = fetch(page, image_src(page, "#original"))
    value = move_slider(page, "#lambda-0", "ArrowLeft", times=4)  # 5 -> 3 in steps of 0.5
    assert value == 3.0
    # Each key press asked for a render; the latest value wins, and its image is the one shown last.
    wait_for_status(page, f"edited in {STEPS} steps at 64x64 px, seed 1: hat 3")
    after_src = wait_for_new_image(page, "#edited", before_src)
    after = fetch(page, after_src)
    assert not np.array_equal(before, after)
    assert np.array_equal(original, fetch(page, image_src(page, "#original")))  # same noise, same original
    edited = download(page, "#downloads", "edited.png", tmp_path)
    assert np.array_equal(np.asarray(Image.open(edited).convert("RGB")), after)
    params = read_png_params(edited)
    assert params["edit"]["concepts"][0]["lambda_fine"] == 3.0 and params["steps"] == int(STEPS)
    assert params["command"] == "edit" and params["preset"] == "flux-mini" and params["weights"]


def test_mask_overlay_toggles_with_a_row_per_concept(page):
    masks = page.locator("#masks")
    assert not masks.is_visible()
    page.locator("#show-masks input[type=checkbox]").check()
    masks.locator("#mask-0 img").wait_for(state="visible")
    assert masks.locator("img:visible").count() == 1  # one concept, one overlay
    page.locator("#add-concept").click()
    set_text(page, "#concept-1", "smile")
    wait_for_status(page, f"edited in {STEPS} steps at 64x64 px, seed 1: hat 5, smile 5")
    masks.locator("#mask-1 img").wait_for(state="visible")
    assert masks.locator("img:visible").count() == 2
    shot(page, "editor.png")
    page.locator("#remove-concept").click()
    page.locator("#concept-1").wait_for(state="hidden")
    page.locator("#show-masks input[type=checkbox]").uncheck()
    masks.wait_for(state="hidden")


def test_dropping_a_png_restores_its_settings(page, tmp_path):
    move_slider(page, "#lambda-0", "ArrowLeft", times=2)  # 4.0
    wait_for_status(page, "edited in 6 steps at 64x64 px, seed 1: hat 4")
    saved = download(page, "#downloads", "edited.png", tmp_path)
    set_text(page, "#seed", "7")
    move_slider(page, "#lambda-0", "ArrowRight", times=6)  # 7.0
    wait_for_status(page, "edited in 6 steps at 64x64 px, seed 7: hat 7")
    old = image_src(page, "#edited")
    page.locator("#restore input[type=file]").set_input_files(str(saved))
    wait_for_status(page, "edited in 6 steps at 64x64 px, seed 1: hat 4")
    assert page.locator("#seed input").input_value() == "1"
    page.wait_for_function("() => document.querySelector('#lambda-0 input[type=range]').value === '4'")
    assert page.locator("#steps input").input_value() == STEPS
    assert np.array_equal(fetch(page, wait_for_new_image(page, "#edited", old)),
                          np.asarray(Image.open(saved).convert("RGB")))  # fmt: skip


def test_an_uploaded_render_round_trips_through_inversion(page, tmp_path):
    render = download(page, "#downloads", "original.png", tmp_path)
    page.get_by_role("tab", name="real image").click()
    page.locator("#upload input[type=file]").set_input_files(str(render))
    page.locator("#invert").click()
    line = wait_for_status(page, "reconstruction PSNR")
    psnr = float(re.search(r"PSNR ([\d.]+) dB", line).group(1))
    assert psnr > 30  # a flux-mini render, midpoint solver, CFG off: about 34 dB at 6 steps
    assert page.inner_text("#psnr").strip() == f"PSNR {psnr:.2f} dB"
    old = image_src(page, "#real-output")
    page.locator("#real-edit").click()
    wait_for_status(page, "edited the upload through inversion")
    edited = fetch(page, wait_for_new_image(page, "#real-output", old))
    assert edited.shape == (64, 64, 3)
    shot(page, "real_image.png")


def test_bad_input_shows_its_message_and_the_page_keeps_working(page, tmp_path):
    old = image_src(page, "#edited")
    set_text(page, "#concept-0", "")
    assert wait_for_status(page, "error:") == (
        "error: concept 0: the edit prompt is empty; give a keyword such as 'eyeglasses'"
    )
    # Valid again, so it renders: let that land before the next request (two requests sent milliseconds
    # apart, as no user types, can reach the server in either order).
    set_text(page, "#concept-0", "hat")
    wait_for_status(page, f"edited in {STEPS} steps at 64x64 px, seed 1: hat 5")
    old = image_src(page, "#edited")
    set_text(page, "#mask-words-0", "glasses")
    assert wait_for_status(page, "error: concept 0: mask word") == (
        "error: concept 0: mask word 'glasses' does not occur in its edit prompt 'hat'; mask words must be words "
        "of the edit prompt"
    )
    set_text(page, "#width", "60")
    assert wait_for_status(page, "error: width") == "error: width 60 is not a multiple of 8; nearest valid: 56 or 64"
    assert image_src(page, "#edited") == old  # a refused request leaves the images as they were
    shot(page, "error.png")
    page.get_by_role("tab", name="real image").click()
    junk = tmp_path / "photo.jpg"
    junk.write_bytes(b"this is not a jpeg")
    page.locator("#upload input[type=file]").set_input_files(str(junk))
    page.locator("#invert").click()
    line = wait_for_status(page, "error: cannot read image")
    assert re.fullmatch(r"error: cannot read image (\S+)/photo\.jpg: cannot identify image file '\1/photo\.jpg'", line)
    # Everything fixed: the page renders again.
    page.get_by_role("tab", name="generated image").click()
    set_text(page, "#mask-words-0", "")
    set_text(page, "#width", "64")
    wait_for_status(page, f"edited in {STEPS} steps at 64x64 px, seed 1: hat 5")
    move_slider(page, "#lambda-0", "ArrowRight")
    wait_for_status(page, f"edited in {STEPS} steps at 64x64 px, seed 1: hat 5.5")
    wait_for_new_image(page, "#edited", old)


def test_latency_benchmark_runs(tmp_path):
    """benchmarks/app_latency.py at toy size, run as a user runs it (its own Playwright, so its own process):
    it drives the page and writes its JSON. No timing is asserted."""
    out = tmp_path / "latency.json"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    args = ["--moves", "2", "--drags", "1", "--drag", "3", "--steps", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "app_latency.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["move"]["n"] == 2 and result["drag_to_last_value"]["n"] == 1
    assert 0 < result["move"]["min_s"] <= result["move"]["median_s"] <= result["move"]["max_s"]
    assert result["settings"]["page_status"].startswith("edited in 2 steps at 64x64 px")
