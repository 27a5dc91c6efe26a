"""The shipped flux-mini (fluxspace/mini/weights/flux-mini): files, strict loading, defaults, the README command."""

import fnmatch
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fluxspace.mini
from flux_core import get_preset
from flux_core.conditioner import TEXT_ENCODER_FOLDERS
from flux_core.files import read_header
from flux_core.loading import load_autoencoder, load_flow_model
from fluxspace import SampleSettings, generate, load_models
from fluxspace.cli import main
from fluxspace.images import METADATA_KEY
from fluxspace.mini.build import AE_FILE, TRANSFORMER_FILE, folder_size
from fluxspace.models import FLUX_MINI_DIR, flux_mini_path
from weights_tools.verify import verify_file

MODEL = FLUX_MINI_DIR
PRESET = get_preset("flux-mini")


@pytest.fixture(scope="module")
def mini_models():
    return load_models()  # no argument: the shipped flux-mini


def test_the_release_is_laid_out_like_the_official_one_and_small():
    names = sorted(p.name for p in MODEL.iterdir())
    assert names == sorted([AE_FILE, TRANSFORMER_FILE, *TEXT_ENCODER_FOLDERS])
    assert folder_size(MODEL) <= 30_000_000
    assert flux_mini_path() == MODEL


def test_pip_install_carries_every_shipped_file():
    # setuptools installs a package's data files only where a package-data glob matches them; a new
    # file or folder under weights/ that no glob covers would be missing from a non-editable install.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(fluxspace.mini.__file__).parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["fluxspace.mini"]
    package = Path(fluxspace.mini.__file__).parent
    shipped = [f.relative_to(package).as_posix() for f in (package / "weights").rglob("*") if f.is_file()]
    assert len(shipped) >= 1 + 2 + len(TEXT_ENCODER_FOLDERS)  # evaluator, transformer, AE, each folder's files
    uncovered = [f for f in shipped if not any(fnmatch.fnmatchcase(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert uncovered == []


@pytest.mark.parametrize("name", [TRANSFORMER_FILE, AE_FILE])
def test_shipped_files_pass_the_official_key_check(name):
    result = verify_file(MODEL / name, "flux-mini")
    assert (result.missing, result.unexpected, result.misshaped, result.problem) == ([], [], [], None)


def test_shipped_files_load_strictly_against_the_preset():
    # The same loaders as the official files, with the preset given: any key or shape off would raise.
    flow = load_flow_model(MODEL / TRANSFORMER_FILE, preset=PRESET)
    assert flow.params == PRESET.params
    assert set(read_header(MODEL / TRANSFORMER_FILE)[1].values()) == {"BF16"}  # released in bf16, like FLUX.1
    ae = load_autoencoder(MODEL / AE_FILE, params=PRESET.ae_params)
    assert ae.params == PRESET.ae_params  # the preset carries the measured scale and shift
    _, _, metadata = read_header(MODEL / AE_FILE)
    assert float(metadata["fluxspace.scale_factor"]) == PRESET.ae_params.scale_factor
    assert float(metadata["fluxspace.shift_factor"]) == PRESET.ae_params.shift_factor


def test_defaults_come_from_the_preset_and_the_same_seed_gives_the_same_image(mini_models):
    models = mini_models
    assert models.preset.name == "flux-mini" and models.pixels_per_token == 8
    prompt = "a cartoon face with red hair and a hat"
    a = generate(models, [prompt], [3], SampleSettings(steps=4), progress=False)[0]
    b = generate(models, [prompt], [3], SampleSettings(steps=4), progress=False)[0]
    c = generate(models, [prompt], [4], SampleSettings(steps=4), progress=False)[0]
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def readme_main_command() -> list[str]:
    """The `fluxspace edit` part of the README's first command, as arguments."""
    text = (FLUX_MINI_DIR.parents[3] / "README.md").read_text()
    line = next(line for line in text.splitlines() if "pip install -e" in line and "fluxspace edit" in line)
    command = line.split("&&")[-1].strip()
    words = shlex.split(command)
    assert words[0].endswith("fluxspace") and words[1] == "edit"
    return words[1:]


def test_the_readme_command_writes_a_side_by_side_png(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = readme_main_command()
    assert "--model" not in args  # it runs on the shipped flux-mini
    assert main([*args, "--quiet"]) == 0
    assert "Loading weights" not in capsys.readouterr().err  # --quiet: no progress bars, transformers' included
    out = tmp_path / args[args.index("--out-dir") + 1]
    side = Image.open(out / "side_by_side.png")
    assert side.height == 64 and side.width > 128
    params = json.loads(side.text[METADATA_KEY])
    assert params["preset"] == "flux-mini" and params["edit"]["concepts"][0]["prompt"]
    assert (out / "original.png").is_file() and (out / "edited.png").is_file()
