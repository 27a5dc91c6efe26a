"""The editor's latency as a user sees it: from a lambda slider move to the new edited image on screen.

Starts `fluxspace app` (flux-mini on the CPU by default, the page's default settings: 64 x 64 px,
20 steps, true CFG 6), opens the page in the system Chromium through Playwright, waits for the first
render, then moves the first concept's lambda_fine slider one step at a time (alternately right and
left, as a user nudging it), and for each move times, on this side of the browser, from the key
press to the moment the page shows a new image, decoded (fluxspace/app/browser.py). Moves are
sequential: each waits for its image, so the figure is one render's round trip through the queue,
the server, the model and the browser, not a backlog.

Then a drag: `--drag` key presses in a row without waiting, timed to the image of the last value
(the values in between are dropped by the queue's always_last trigger, not rendered one by one).

    python benchmarks/app_latency.py                    # prints JSON, writes benchmarks/results/app_latency.json
    python benchmarks/app_latency.py --moves 40 --steps 20 -- --device cpu
"""

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import RESULTS, machine_info, write_json  # noqa: E402

from fluxspace.app.browser import (  # noqa: E402
    chromium,
    free_port,
    image_src,
    move_slider,
    running_app,
    set_text,
    wait_for_new_image,
    wait_for_render,
    wait_for_status,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moves", type=int, default=30, help="single slider moves timed (default 30)")
    p.add_argument("--drag", type=int, default=6, help="key presses of the drag (default 6)")
    p.add_argument("--drags", type=int, default=5, help="drags timed (default 5)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the page's, the preset's)")
    p.add_argument("--out", type=Path, default=RESULTS / "app_latency.json")
    p.add_argument("app_args", nargs="*", help="after --: flags for `fluxspace app` (--model, --device, ...)")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "p90_s": percentile(values, 0.9), "min_s": min(values),
            "max_s": max(values), "n": len(values), "values_s": values}  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    moves, drags = [], []
    load_before = os.getloadavg()
    with running_app(["--port", str(free_port()), *args.app_args]) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        wait_for_render(page)
        if args.steps is not None:
            old = image_src(page, "#edited")
            set_text(page, "#steps", str(args.steps))
            wait_for_new_image(page, "#edited", old)
        status = wait_for_status(page, "edited in")
        for k in range(args.moves):
            old = image_src(page, "#edited")
            t0 = time.perf_counter()
            move_slider(page, "#lambda-0", "ArrowRight" if k % 2 == 0 else "ArrowLeft")
            wait_for_new_image(page, "#edited", old)
            moves.append(time.perf_counter() - t0)
        for k in range(args.drags):
            old = image_src(page, "#edited")
            t0 = time.perf_counter()
            value = move_slider(page, "#lambda-0", "ArrowRight" if k % 2 == 0 else "ArrowLeft", times=args.drag)
            page.wait_for_function("v => document.querySelector('#status').innerText.trim().endsWith(' ' + v)",
                                   arg=f"{value:g}", timeout=120_000)  # fmt: skip
            wait_for_new_image(page, "#edited", old)
            drags.append(time.perf_counter() - t0)
    result = {
        "what": "slider move (one key press) -> new edited image decoded on the page, through Playwright",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"app_args": args.app_args, "steps": args.steps, "page_status": status, "drag_presses": args.drag},
        "machine": machine_info("cpu"),
        # Other work on the machine slows every figure: the 1-minute load average before and after.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "move": summary(moves),
        "drag_to_last_value": summary(drags),
    }
    write_json(args.out, result)
    print(json.dumps({k: {m: v for m, v in result[k].items() if m != "values_s"} for k in ("move", "drag_to_last_value")},
                     indent=2))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
