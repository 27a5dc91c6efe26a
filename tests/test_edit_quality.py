"""The edit-quality benchmark (benchmarks/edit_quality.py): metrics on hand-made cases, tuning rule, sharding."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scripts import BENCHMARKS, load_script

from fluxspace.images import psnr
from fluxspace.mini.attributes import Attributes
from fluxspace.mini.evaluator import load_evaluator
from fluxspace.mini.render import render

edit_quality = load_script("edit_quality")
METHODS, TASKS = edit_quality.METHODS, edit_quality.TASKS
choose_strength, score_pair, summarise = edit_quality.choose_strength, edit_quality.score_pair, edit_quality.summarise
BASE = Attributes("medium", "brown", "oval", "blue", "none", "none", "neutral", "beard", "flat")
TASK = {t.name: t for t in TASKS}


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator().eval()


def test_an_image_against_itself_is_perfectly_preserved(evaluator):
    image = render(BASE, seed=3, size=64)
    r = score_pair(evaluator, TASK["eyeglasses"], image, image)
    assert r["success"] is False  # no eyeglasses appeared
    assert r["preservation"] == 1.0 and r["psnr_outside"] == 100.0
    assert r["feature"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "task,attrs",
    [("eyeglasses", BASE.with_("eyewear", "eyeglasses")), ("hat", BASE.with_("hat", "hat")),
     ("remove beard", BASE.with_("beard", "none")), ("sketch", BASE.with_("style", "sketch"))],
)  # fmt: skip
def test_a_rendered_attribute_flip_is_detected(evaluator, task, attrs):
    before, after = render(BASE, seed=3, size=64), render(attrs, seed=3, size=64)
    r = score_pair(evaluator, TASK[task], before, after)
    assert r["success"] is True and r["preservation"] == 1.0
    assert r["text"] > 0.9
    if TASK[task].family != "style":  # a local flip leaves every pixel outside its region alone
        assert r["psnr_outside"] == 100.0
    else:
        assert r["psnr_outside"] < 30.0  # the style changes the whole image
    assert r["feature"] < 0.999


def test_already_present_is_not_counted(evaluator):
    image = render(BASE.with_("hat", "hat"), seed=4, size=64)
    assert score_pair(evaluator, TASK["hat"], image, image)["success"] is None
    assert summarise([{"success": None, "preservation": 1.0, "feature": 1.0, "psnr_outside": 100.0, "text": 1.0}])["n"] == 0


def test_psnr_ignores_pixels_outside_keep():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0] = 255
    keep = np.ones((4, 4), bool)
    assert psnr(a, b, keep) == pytest.approx(10 * np.log10(16))  # one of 16 pixels fully off
    assert psnr(a, b) == pytest.approx(10 * np.log10(16))  # keep=None: every pixel
    keep[0, 0] = False
    assert psnr(a, b, keep) == 100.0


def test_tuning_rule():
    m = next(m for m in METHODS if m.key == "c")

    def cell(rate):
        return {"success": {"mean": rate}}

    assert choose_strength(m, {2.0: cell(0.5), 4.0: cell(0.85), 8.0: cell(0.95)}) == 4.0  # smallest reaching 80%
    assert choose_strength(m, {2.0: cell(0.5), 4.0: cell(0.7), 8.0: cell(0.7)}) == 4.0  # else best, smaller on ties


def test_bootstrap_interval_brackets_the_mean():
    rows = [{"success": bool(i % 3), "preservation": 1.0, "feature": 0.9, "psnr_outside": 40.0, "text": 0.8}
            for i in range(30)]  # fmt: skip
    s = summarise(rows)
    assert s["n"] == 30 and s["success"]["mean"] == pytest.approx(20 / 30)
    assert s["success"]["low"] < s["success"]["mean"] < s["success"]["high"]
    assert s["preservation"] == {"mean": 1.0, "low": 1.0, "high": 1.0}


def test_sharded_run_equals_single_process(tmp_path):
    common = ["--seeds", "2", "--tune-seeds", "1", "--steps", "3", "--strengths", "2", "--methods", "acg",
              "--tasks", "eyeglasses,remove beard", "--grid-rows", "0", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # equal thread counts: bit-identical numbers
    module = [str(BENCHMARKS / "edit_quality.py")]
    subprocess.run([sys.executable, *module, *common, "--out", str(tmp_path / "one")], env=env, check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *module,
                    *common, "--out", str(tmp_path / "two")], env=env, check=True, capture_output=True)  # fmt: skip
    one, two = (json.loads((tmp_path / d / "edit_quality.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # At most 2 tasks x 2 base images x 3 methods reported, 2 x 1 x 4 settings tuned (screening may find fewer).
    assert 0 < len(one["rows"]) <= 12 and 0 < len(one["tune_rows"]) <= 8
    for key in ("rows", "tune_rows", "chosen", "curves", "results"):
        assert one[key] == two[key], key
    # Each report names the command that made it, launcher and thread count included.
    args = " ".join(common + ["--out"])
    one_md, two_md = ((tmp_path / d / "edit_quality.md").read_text() for d in ("one", "two"))
    assert f"Regenerate: `python benchmarks/edit_quality.py {args} {tmp_path / 'one'}`" in one_md
    assert (f"Regenerate: `OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/edit_quality.py "
            f"{args} {tmp_path / 'two'}`") in two_md  # fmt: skip
    names = {p.name for p in (tmp_path / "two" / "shards").iterdir()}
    phases = ("screen-tune-0", "tune", "screen-report-0", "report")  # screening rounds of ceil(n / 2): 1 then 1
    assert {f"{n}-rank{r}-of2.json" for n in phases for r in (0, 1)} <= names
