"""benchmarks/mini_quality.py: its metrics behave on hand-made inputs, and a --quick run on a random tiny
checkpoint set writes every section with its PASS/FAIL fields (the numbers of a random model mean nothing)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxspace.mini.attributes import Attributes
from fluxspace.mini.evaluator import load_evaluator
from fluxspace.mini.render import render_batch, to_tensor
from weights_tools.random_weights import write_random_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mini_quality.py"
_spec = importlib.util.spec_from_file_location("benchmarks_mini_quality", SCRIPT)
mini_quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mini_quality)


def test_adherence_is_full_on_renders_of_the_stated_attributes():
    cases = mini_quality.adherence_cases(12, seed=3)
    rng = np.random.default_rng(0)
    attrs = []
    for facts in cases:  # the stated values, the rest filled in at random
        values = {f: facts.get(f, vs[rng.integers(len(vs))]) for f, vs in mini_quality.FAMILIES.items()}
        attrs.append(Attributes(**values))
    images = render_batch(attrs, list(range(2**31, 2**31 + len(attrs))))
    result = mini_quality.score_adherence(load_evaluator(), images, cases)
    assert result["stated"] == sum(len(c) for c in cases)
    assert result["overall"] == 1.0
    assert all(r["rate"] in (1.0, None) for r in result["per_family"].values())
    assert all(t["pass"] for t in mini_quality.adherence_targets(result).values())


def test_adherence_cases_state_held_out_promptable_values():
    cases = mini_quality.adherence_cases(20, seed=0)
    assert cases == mini_quality.adherence_cases(20, seed=0)
    assert all(c and all((f, v) in mini_quality.KEYWORD for f, v in c.items()) for c in cases)


def test_psnr_of_an_image_with_itself_is_very_high_and_noise_lowers_it():
    x = to_tensor(
        render_batch(
            [Attributes("light", "red", "oval", "blue", "none", "hat", "smile", "none", "flat")], [0]
        )
    )
    assert mini_quality.psnr_db(x, x).item() >= 120
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert 20 < mini_quality.psnr_db(noisy, x).item() < 40


def test_coverage_and_edit_outcome():
    preds = [{f: vs[0] for f, vs in mini_quality.FAMILIES.items()}]
    cov = mini_quality.coverage(preds)
    assert not cov["pass"] and cov["missing"]["hat"] == ["hat"] and cov["result"] == "FAIL"
    edit = mini_quality.EDITS["hat"]
    after = preds[0] | {"hat": "hat", "mouth": "frown"}
    ok, kept = mini_quality.edit_outcome(edit, preds[0], after)
    assert ok and kept == pytest.approx(7 / 8)


def test_most_changed_lists_the_most_disturbed_families_first():
    assert mini_quality.most_changed({"hat": 15, "beard": 13, "skin": 0, "mouth": 10, "style": 3}) == "hat 15, beard 13, mouth 10"
    assert mini_quality.most_changed({"hat": 0, "beard": 0}) == "-"


def test_missing_model_says_how_to_build_it(tmp_path):
    with pytest.raises(SystemExit, match="python -m fluxspace.mini.build"):
        mini_quality.main(["--model", str(tmp_path / "nope"), "--quick"])


def test_quick_run_on_random_tiny_checkpoint_writes_every_section(tmp_path):
    write_random_checkpoint("tiny", tmp_path / "model", seed=0, dtype="float32")
    out = tmp_path / "q.json"
    data = mini_quality.main(["--model", str(tmp_path / "model"), "--quick", "--size", "64", "--edits",
                              "hat,smile", "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["passed"] == data["passed"] and isinstance(saved["passed"], bool)
    for section in ("adherence", "empty", "ae", "speed", "edits"):
        assert section in saved
    assert set(saved["adherence"]["targets"]) == {"overall", "worst_family"}
    assert saved["empty"]["result"] in ("PASS", "FAIL")
    assert saved["ae"]["targets"]["psnr"]["result"] in ("PASS", "FAIL")
    assert len(saved["speed"]["seconds"]) == 1
    assert set(saved["edits"]) == {"hat", "smile"}
    for e in saved["edits"].values():
        assert {t["result"] for t in e["targets"].values()} <= {"PASS", "FAIL"}
        assert set(e["changed"]) == set(mini_quality.FAMILIES) - {e["family"]}
        assert all(0 <= n <= e["seeds"] for n in e["changed"].values())
