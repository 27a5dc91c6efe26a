"""The shipped flux-mini-kontext (fluxspace/mini/weights/flux-mini-kontext): its file, strict loading,
defaults, an edit read on a held-out face, and the README's Kontext commands."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_core import get_preset
from flux_core.files import read_header
from flux_core.loading import load_flow_model
from fluxspace import Concept, EditSpec, edit_image, load_models
from fluxspace.cli import main
from fluxspace.images import read_png_params
from fluxspace.mini.evaluator import load_evaluator
from fluxspace.mini.train_kontext import TRANSFORMER_FILE
from fluxspace.models import FLUX_MINI_DIR, shipped_paths
from weights_tools.verify import verify_file

FILE = FLUX_MINI_DIR.parent / "flux-mini-kontext" / TRANSFORMER_FILE
PRESET = get_preset("flux-mini-kontext")
README = FLUX_MINI_DIR.parents[3] / "README.md"


@pytest.fixture(scope="module")
def kontext():
    return load_models("flux-mini-kontext")


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


def test_the_release_is_one_transformer_file_beside_flux_mini():
    assert sorted(p.name for p in FILE.parent.iterdir()) == [TRANSFORMER_FILE]
    paths = shipped_paths("flux-mini-kontext")
    assert (paths.transformer, paths.ae, paths.text_encoders) == (FILE, FLUX_MINI_DIR / "ae.safetensors", FLUX_MINI_DIR)


def test_the_file_passes_the_official_key_check_and_loads_strictly():
    result = verify_file(FILE, "flux-mini-kontext")
    assert (result.missing, result.unexpected, result.misshaped, result.problem) == ([], [], [], None)
    flow = load_flow_model(FILE, preset=PRESET)
    assert flow.params == PRESET.params
    _, dtypes, metadata = read_header(FILE)
    assert set(dtypes.values()) == {"BF16"}
    assert metadata["fluxspace.preset"] == "flux-mini-kontext"  # Kontext's keys equal its base model's
    training = json.loads(metadata["training"])  # how it was made, both stages
    assert (training["steps"], training["pairs"], training["base_training"]["steps"]) == (5000, 16000, 3000)


def test_defaults_come_from_the_preset(kontext):
    assert kontext.preset.name == "flux-mini-kontext" and kontext.preset.kontext_resolutions == ((64, 64),)
    settings = kontext.sample_settings(None)
    assert (settings.steps, settings.cfg_scale, settings.width, settings.height) == (20, 3.0, 64, 64)


def _held_out_face():
    from fluxspace.mini.attributes import sample_attributes
    from fluxspace.mini.render import render

    attrs = sample_attributes(np.random.default_rng(5), "held_out").with_("hat", "none")
    return render(attrs, 2**31 + 123_456, size=64)  # a render seed above every training seed


def test_a_hat_by_instruction_and_fluxspace_taking_it_off_again(kontext, evaluator):
    # The question on one held-out face: lambda 0 is Kontext's edit (a hat), a negative
    # lambda along "hat" (no mask) undoes it, and the rest of the face stays.
    face = _held_out_face()
    spec = EditSpec(concepts=(Concept("hat", -4.0, 0.0),), start=0.9)
    r = edit_image(kontext, "add a hat", spec, seed=1, progress=False, image=face)
    before, kontext_edit, undone = evaluator.score([face, r.original, r.edited]).predicted
    assert (before["hat"], kontext_edit["hat"], undone["hat"]) == ("none", "hat", "none")
    others = [f for f in before if f != "hat"]
    assert sum(before[f] == kontext_edit[f] for f in others) >= len(others) - 1


def readme_kontext_commands() -> list[list[str]]:
    """The `fluxspace` commands of the README's Kontext section, as argument lists."""
    text = README.read_text()
    section = text[text.index("## Kontext") :]
    section = section[: section.index("\n## ", 1)]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith(".venv/bin/fluxspace ")]
    return [shlex.split(line)[1:] for line in lines]


def test_the_readme_kontext_commands(tmp_path, monkeypatch, evaluator):
    monkeypatch.chdir(tmp_path)
    commands = readme_kontext_commands()
    assert [c[0] for c in commands] == ["generate", "generate", "sweep", "edit"]
    for argv in commands:
        assert main([*argv, "--quiet"]) == 0, argv
    face, hat = Image.open("out/face.png"), Image.open("out/hat.png")
    before, after = evaluator.score([face, hat]).predicted
    assert (before["hat"], after["hat"]) == ("none", "hat")
    assert read_png_params(Path("out/hat.png"))["preset"] == "flux-mini-kontext"
    strip = read_png_params(Path("out/hat-strength.png"))
    assert strip["preset"] == "flux-mini-kontext"
    edited = read_png_params(Path("out/kontext-edit/edited.png"))
    assert edited["edit"]["concepts"][0]["lambda_fine"] == -2.0
