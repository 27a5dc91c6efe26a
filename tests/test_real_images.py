"""Real images through inversion with a loaded model (fluxspace/inversion.py), on a random tiny checkpoint."""

import numpy as np
import pytest
from PIL import Image

from fluxspace import Concept, EditSpec, SampleSettings
from fluxspace.inversion import InversionSettings, fit_image, invert_image, psnr, read_image


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))


def test_fit_resize_and_crop(photo):
    assert fit_image(photo, 16).size == (64, 48)  # 70 -> 64, 50 -> 48: nearest multiples
    assert fit_image(photo, 16, "crop").size == (64, 48)
    cropped = fit_image(photo, 16, "crop")
    assert np.array_equal(np.asarray(cropped), np.asarray(photo)[1:49, 3:67])  # centred, not resampled
    assert fit_image(photo, 8, size=32).size == (32, 24)  # longer side 32, then multiples of 8
    with pytest.raises(ValueError, match="a 12x9 image cannot be cropped to a multiple of 16 px"):
        fit_image(photo.resize((12, 9)), 16, "crop")
    with pytest.raises(ValueError, match="unknown fit 'pad'; valid: resize, crop"):
        fit_image(photo, 16, "pad")


def test_unreadable_and_non_rgb_images_are_refused(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(bad)
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="image mode 'I;16' is not an RGB-convertible image"):
        read_image(Image.new("I;16", (8, 8)))
    assert read_image(Image.new("L", (8, 8))).mode == "RGB"


def test_reconstruction_reports_psnr_and_evaluations(models, photo):
    r = invert_image(models, photo, "a photo", settings=SampleSettings(steps=3))
    assert r.image.size == r.reconstruction.size == (64, 48)
    assert r.psnr == psnr(r.image, r.reconstruction) and r.evaluations == 6
    fire = invert_image(models, photo, "a photo", settings=SampleSettings(steps=3), inversion=InversionSettings(solver="midpoint", reuse=True))
    assert fire.evaluations == 2 * 4  # 4 evaluations each way: 2 for the first step, 1 after


def test_edit_with_zero_scales_returns_the_reconstruction(models, photo):
    off = EditSpec(concepts=(Concept("glasses", 0.0),))
    r = invert_image(models, photo, "a photo", settings=SampleSettings(steps=3), edit_spec=off, inversion=InversionSettings(gamma=0.5, eta=0.9))
    assert np.array_equal(np.asarray(r.edited), np.asarray(r.reconstruction))
    on = invert_image(models, photo, "a photo", settings=SampleSettings(steps=3), edit_spec=EditSpec(concepts=(Concept("glasses", 6.0),)))
    assert not np.array_equal(np.asarray(on.edited), np.asarray(on.reconstruction))
    assert len(on.masks) == 1 and on.masks[0].shape == (3, 4)


def test_bad_settings_are_refused_before_the_model_runs(models, photo):
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]; got 2"):
        invert_image(models, photo, inversion=InversionSettings(eta=2))
    with pytest.raises(ValueError, match="steps must be an integer >= 1; got 0"):
        invert_image(models, photo, settings=SampleSettings(steps=0))


def test_edit_image_takes_a_real_image(models, photo):
    from fluxspace import SampleSettings, edit_image

    spec = EditSpec(concepts=(Concept("glasses", 0.0),))
    r = edit_image(models, "a photo", spec, settings=SampleSettings(steps=3), image=photo, fit="crop")
    assert r.original.size == (64, 48) and r.settings.cfg_scale == 1.0
    assert np.array_equal(np.asarray(r.original), np.asarray(r.edited))  # zero scales: the reconstruction
    from fluxspace.inversion import InversionSettings

    with pytest.raises(ValueError, match=r"^inversion settings need image= \(the real image to invert\)$"):
        edit_image(models, "a photo", spec, settings=SampleSettings(steps=3), inversion=InversionSettings())


def test_cli_invert_and_edit_a_real_image(tiny_checkpoint, photo, tmp_path, capsys):
    from fluxspace.cli import main
    from fluxspace.images import read_png_params

    src = tmp_path / "photo.png"
    photo.save(src)
    model = ["--model", str(tiny_checkpoint.transformer), "--steps", "2", "--quiet"]
    assert main(["invert", str(src), "--fireflow", "--out", str(tmp_path / "rec.png"), *model]) == 0
    params = read_png_params(tmp_path / "rec.png")
    assert params["inversion"]["solver"] == "midpoint" and params["inversion"]["reuse"] is True
    assert f"reconstruction PSNR {params['psnr_db']:.2f} dB at 64x48" in capsys.readouterr().out
    out = tmp_path / "edit"
    assert main(["edit", "a photo", "--edit", "glasses", "--image", str(src), "--fit", "crop", "--gamma", "0.5",
                 "--eta", "0.9", "--out-dir", str(out), *model]) == 0  # fmt: skip
    assert read_png_params(out / "side_by_side.png")["fit"] == "crop"
    with pytest.raises(SystemExit):
        main(["invert", str(src), "--gamma", "1.5", *model])
    assert "gamma must be in [0, 1]; got 1.5" in capsys.readouterr().err
