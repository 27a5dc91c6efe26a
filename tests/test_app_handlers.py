"""The editor's handlers without a browser (fluxspace/app/handlers.py), and the page's wiring of them
(fluxspace/app/page.py) called directly: every control, every refusal's message, the metadata round trip."""

import dataclasses
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxspace.app import handlers as h
from fluxspace.cli import main
from fluxspace.images import read_png_params, save_png
from fluxspace.spec import Concept, EditSpec

SMALL = dict(width=64, height=48, steps=3)


def sample(**kw) -> h.SampleControls:
    return h.SampleControls(**{"prompt": "a smiling woman", "seed": 3, **SMALL, **kw})


def edit(*rows: h.ConceptRow, **kw) -> h.EditControls:
    return h.EditControls(concepts=rows or (h.ConceptRow("glasses", 4.0),), **kw)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def outputs(tmp_path):
    return h.Outputs(tmp_path / "out")


def test_spec_from_every_edit_control():
    c = h.EditControls(
        concepts=(h.ConceptRow(" red hat ", -2.5, 0.3, "hat, red"), h.ConceptRow("glasses", 4.0, 0.0, "")),
        lambda_coarse=0.4, coarse_prompt="  ", start="2", end="0.3", blocks="0-2,5", prior="a face",
        projection="before_proj", coarse_target="both", prior_removal="difference", reference=False,
    )  # fmt: skip
    assert h.spec_from(c) == EditSpec(
        concepts=(Concept("red hat", -2.5, 0.3, ("hat", "red")), Concept("glasses", 4.0, 0.0, None)),
        lambda_coarse=0.4, coarse_prompt=None, start=2, end=0.3, blocks=(0, 1, 2, 5), prior_prompt="a face",
        projection="before_proj", coarse_target="both", prior_removal="difference",
    )  # fmt: skip
    # Empty boxes are the defaults; a time stays a time.
    spec = h.spec_from(h.EditControls(concepts=(h.ConceptRow("hat"),), start="", coarse_prompt="hats", reference=True))
    assert (spec.start, spec.end, spec.blocks, spec.coarse_prompt, spec.reference) == (0, None, None, "hats", True)
    assert h.spec_from(h.EditControls(start="0.8", end="2")).start == 0.8


def test_sample_settings_from_controls(models):
    s = h.settings_from(models, h.SampleControls("x", width=None, height=None, steps=None))
    assert s == models.sample_settings(None)
    s = h.settings_from(models, sample(cfg_scale=3.0, negative_prompt="blurry", guidance=2.0))
    assert (s.width, s.height, s.steps, s.cfg_scale, s.negative_prompt, s.guidance) == (64, 48, 3, 3.0, "blurry", 2.0)


# Every refusal of the generated-image controls, exactly as the page shows it.
REFUSALS = [
    (dict(), dict(rows=(h.ConceptRow("  "),)),
     "concept 0: the edit prompt is empty; give a keyword such as 'eyeglasses'"),
    (dict(), dict(rows=(h.ConceptRow("red hat", mask_words="glasses"),)),
     "concept 0: mask word 'glasses' does not occur in its edit prompt 'red hat'; mask words must be words of the "
     "edit prompt"),
    (dict(width=50), dict(), "width 50 is not a multiple of 16; nearest valid: 48 or 64"),
    (dict(height=0), dict(), "height must be in [1, ...]; got 0"),
    (dict(width=8192, height=8192), dict(),
     "8192x8192 px is 67,108,864 pixels; at most 4096 x 4096 = 16,777,216 are sampled"),
    (dict(steps=2.5), dict(), "steps must be a whole number; got 2.5"),
    (dict(prompt="  "), dict(), "the prompt is empty; describe the image to generate"),
    (dict(seed=-1), dict(), "seed must be in [0, 18446744073709551615]; got -1"),
    (dict(seed=None), dict(), "seed must be a whole number; got None"),
    (dict(), dict(start="soon"), "--start must be a step index (e.g. 2) or a time in [0, 1] (e.g. 0.8); got 'soon'"),
    (dict(), dict(start="3"), "start step 3 is past the last step: 3 steps run as steps 0..2"),
    (dict(), dict(start="2", end="1"), "start (2) is not before end (1): the edit would never be on"),
    (dict(), dict(blocks="0-3"), "double block indices [1, 2, 3] out of range; this model has double blocks 0..0"),
    (dict(), dict(blocks="3-1"), "--blocks: the range '3-1' runs backwards; write it as 1-3"),
    (dict(), dict(coarse_prompt="", rows=()),
     "an edit needs at least one concept (an edit prompt), or a coarse_prompt for a coarse-only edit"),
    (dict(), dict(rows=(h.ConceptRow("a"), h.ConceptRow("b")), reference=True),
     "reference mode reproduces the unofficial code, which takes exactly one concept; got 2"),
]  # fmt: skip


@pytest.mark.parametrize("sample_kw, edit_kw, message", REFUSALS)
def test_render_refusals(models, outputs, sample_kw, edit_kw, message):
    rows = edit_kw.pop("rows", (h.ConceptRow("glasses"),))
    with pytest.raises(ValueError) as e:
        h.render_edit(models, outputs, sample(**sample_kw), h.EditControls(concepts=rows, **edit_kw))
    assert h.describe(e.value) == message
    assert not any(outputs.root.iterdir())  # refused before any work: no folder made


def test_render_edit_writes_the_cli_outputs_and_metadata(models, outputs, tmp_path):
    r = h.render_edit(models, outputs, sample(), edit(h.ConceptRow("glasses", 4.0), h.ConceptRow("red hat", -2.0)))
    assert [p.name for p in r.files] == ["original.png", "edited.png", "side_by_side.png", "mask-glasses.png",
                                         "mask-red-hat.png"]  # fmt: skip
    assert (r.original, r.edited) == (r.files[0], r.files[1])
    assert [(p.name, c) for p, c in r.overlays] == [("mask-glasses.png", "glasses"), ("mask-red-hat.png", "red hat")]
    assert Image.open(r.edited).size == (64, 48)
    assert not np.array_equal(pixels(r.original), pixels(r.edited))
    params = read_png_params(r.edited)
    assert params["command"] == "edit" and params["image"] == "edited" and params["seed"] == 3
    assert params["edit"]["concepts"][1] == {"prompt": "red hat", "lambda_fine": -2.0, "tau_m": 0.5, "mask_words": None}
    assert r.message == "edited in 3 steps at 64x48 px, seed 3: glasses 4, red hat -2"
    # The same edit through the CLI gives the same pixels.
    cli_out = tmp_path / "cli"
    main(["edit", "a smiling woman", "--edit", "glasses:4", "--edit", "red hat:-2", "--seed", "3", "--width", "64",
          "--height", "48", "--steps", "3", "--quiet", "--model", str(models.paths.transformer), "--out-dir", str(cli_out)])  # fmt: skip
    assert np.array_equal(pixels(cli_out / "edited.png"), pixels(r.edited))


def test_lambda_changes_the_image_and_the_metadata(models, outputs):
    a = h.render_edit(models, outputs, sample(), edit(h.ConceptRow("glasses", 2.0)))
    b = h.render_edit(models, outputs, sample(), edit(h.ConceptRow("glasses", -3.5)))
    assert np.array_equal(pixels(a.original), pixels(b.original))  # same noise
    assert not np.array_equal(pixels(a.edited), pixels(b.edited))
    assert read_png_params(b.edited)["edit"]["concepts"][0]["lambda_fine"] == -3.5
    assert a.edited.parent != b.edited.parent  # each request its own folder


def test_metadata_round_trip_restores_every_control(models, outputs):
    controls = h.EditControls(
        concepts=(h.ConceptRow("red hat", -2.5, 0.25, "hat"), h.ConceptRow("glasses", 4.0, 0.0, "")),
        lambda_coarse=0.3, coarse_prompt="hats", start="1", end="0.2", blocks="0", prior="a face",
        projection="before_proj", coarse_target="both", prior_removal="orthogonal",
    )  # fmt: skip
    s = sample(cfg_scale=2.0, negative_prompt="blurry", guidance=3.0)
    r = h.render_edit(models, outputs, s, controls)
    restored = h.restore(str(r.edited))
    assert restored.edit == controls
    assert restored.sample == s
    assert restored.solver is None
    assert restored.message == "restored the settings of edited.png (edit PNG, 2 concept(s))"
    again = h.render_edit(models, outputs, restored.sample, restored.edit)
    assert np.array_equal(pixels(again.edited), pixels(r.edited))


def test_restore_a_generated_png_and_another_versions_inversion(models, tmp_path):
    out = tmp_path / "gen.png"
    main(["generate", "a red bicycle", "--seed", "9", "--quiet", "--model", str(models.paths.transformer), "--out",
          str(out), "--width", "64", "--height", "48", "--steps", "3"])  # fmt: skip
    r = h.restore(str(out))
    assert r.edit is None and r.solver is None  # the edit controls are left as they are
    assert (r.sample.prompt, r.sample.seed, r.sample.width, r.sample.steps) == ("a red bicycle", 9, 64, 3)
    assert r.message == "restored the settings of gen.png (generate PNG)"
    other = tmp_path / "other.png"
    save_png(Image.new("RGB", (8, 8)), other, {"prompt": "p", "inversion": {"solver": "euler", "new_option": 1}})
    assert h.restore(str(other)).solver is None


def test_restore_refusals(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    many = tmp_path / "many.png"
    spec = EditSpec(concepts=tuple(Concept(f"w{i}") for i in range(h.MAX_CONCEPTS + 1)))
    save_png(Image.new("RGB", (8, 8)), many, {"prompt": "p", "edit": dataclasses.asdict(spec)})
    cases = [
        (None, "no PNG given; drop a PNG written by fluxspace"),
        (str(plain), "plain.png holds no fluxspace settings (a PNG written by fluxspace has a 'fluxspace' metadata chunk)"),
        (str(text), f"cannot read settings from notes.png: cannot identify image file '{text}'"),
        (str(many), f"many.png has {h.MAX_CONCEPTS + 1} concepts; this page takes at most {h.MAX_CONCEPTS}"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as e:
            h.restore(path)
        assert h.describe(e.value) == message


def test_strip_over_lambda(models, outputs):
    r = h.render_strip(models, outputs, sample(), edit(), 0.0, 6.0, 4)
    assert r.files == [r.strip]
    grid = Image.open(r.strip)
    assert grid.width == 5 * 64 + 4 * 4  # the unedited image, then one cell per value
    params = read_png_params(r.strip)
    assert params["command"] == "sweep" and params["vary"] == {"lambda_fine": [0.0, 2.0, 4.0, 6.0]}
    assert r.message == "lambda_fine = 0.0, 2.0, 4.0, 6.0"
    for count, message in [(1, "the strip's image count must be in [2, 9]; got 1"),
                           (2.5, "the strip's image count must be a whole number; got 2.5")]:  # fmt: skip
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            h.render_strip(models, outputs, sample(), edit(), 0.0, 1.0, count)
    with pytest.raises(ValueError, match="a lambda strip needs at least one concept"):
        h.render_strip(models, outputs, sample(), h.EditControls(coarse_prompt="hats", lambda_coarse=0.5), 0, 1, 3)


def huge_png_header(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (no pixel data needed: the header is refused)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture
def render_png(models, outputs):
    """A 64 x 48 render of the tiny model, as a user would upload it."""
    r = h.render_edit(models, outputs, sample(), edit())
    return r.original


@pytest.mark.parametrize("solver", list(h.SOLVERS))
def test_inversion_reports_psnr(models, outputs, render_png, solver):
    r = h.render_inversion(models, outputs, sample(prompt="a smiling woman"), h.RealControls(str(render_png), solver,
                                                                                            size=None))  # fmt: skip
    assert [p.name for p in r.files] == ["input.png", "reconstruction.png"]
    assert np.isfinite(r.psnr) and r.psnr > 5
    params = read_png_params(r.edited)
    assert params["command"] == "invert" and params["psnr_db"] == r.psnr and params["image_path"] == "original.png"
    assert params["inversion"] == dataclasses.asdict(h.SOLVERS[solver])
    assert r.message.startswith(f"reconstruction PSNR {r.psnr:.2f} dB at 64x48 px, 3 steps, ")
    assert h.restore(str(r.edited)).solver == solver


def test_real_image_edit_and_its_refusals(models, outputs, render_png, tmp_path):
    real = h.RealControls(str(render_png), "midpoint (RF-Solver)", "crop", size=40)
    r = h.render_real_edit(models, outputs, sample(), edit(), real)
    assert Image.open(r.edited).size == (32, 16)  # resized to 40 x 30, then cropped to multiples of 16
    params = read_png_params(r.edited)
    assert params["fit"] == "crop" and params["inversion"]["solver"] == "midpoint"
    restored = h.restore(str(r.edited))
    assert restored.solver == "midpoint (RF-Solver)" and restored.edit == edit()

    unreadable = tmp_path / "photo.jpg"
    unreadable.write_bytes(b"not a jpeg at all")
    huge = tmp_path / "huge.png"
    huge_png_header(huge, 9000, 8000)
    cases = [
        (h.RealControls(None), "no image uploaded; drop a PNG or JPEG on the upload box first"),
        (h.RealControls(str(unreadable)),
         f"cannot read image {unreadable}: cannot identify image file '{unreadable}'"),
        (h.RealControls(str(huge)),
         f"image {huge} is 9000x8000 px (72,000,000 pixels); at most 64,000,000 are read: downscale it first"),
        (h.RealControls(str(render_png), solver="heun"),
         f"unknown solver 'heun'; valid: {', '.join(h.SOLVERS)}"),
        (h.RealControls(str(render_png), size=0), "size must be in [1, 4096]; got 0"),
    ]  # fmt: skip
    for controls, message in cases:
        for run in (h.render_inversion, lambda m, o, s, c: h.render_real_edit(m, o, s, edit(), c)):
            with pytest.raises(ValueError) as e:
                run(models, outputs, sample(), controls)
            assert h.describe(e.value) == message


@pytest.fixture(scope="module")
def flux2_models(tmp_path_factory):
    """The tiny-flux2 set `flux-weights random` writes (random FLUX.2 transformer, autoencoder, Qwen3)."""
    from fluxspace import load_models
    from weights_tools.cli import main as weights_main

    folder = tmp_path_factory.mktemp("tiny-flux2")
    assert weights_main(["random", "--preset", "tiny-flux2", "--out", str(folder), "--dtype", "float32"]) == 0
    return load_models(folder)


def test_the_editor_on_flux2(flux2_models, outputs, tmp_path):
    """The generated-image tab and the strip work on FLUX.2 as on FLUX.1 (same pixels as the CLI); what
    FLUX.2 lacks (the coarse edit's pooled vector, inversion) is refused in the page's one line."""
    m = flux2_models
    kw = dict(width=64, height=48, steps=2)
    r = h.render_edit(m, outputs, sample(**kw), edit(h.ConceptRow("glasses", 4.0)))
    assert [p.name for p in r.files] == ["original.png", "edited.png", "side_by_side.png", "mask-glasses.png"]
    assert not np.array_equal(pixels(r.original), pixels(r.edited)) and Image.open(r.edited).size == (64, 48)
    params = read_png_params(r.edited)
    assert params["preset"] == "tiny-flux2" and params["edit"]["concepts"][0]["lambda_fine"] == 4.0
    main(["edit", "a smiling woman", "--edit", "glasses:4", "--seed", "3", "--width", "64", "--height", "48",
          "--steps", "2", "--quiet", "--model", str(m.paths.transformer), "--out-dir", str(tmp_path / "cli")])  # fmt: skip
    assert np.array_equal(pixels(tmp_path / "cli" / "edited.png"), pixels(r.edited))
    strip = h.render_strip(m, outputs, sample(**kw), edit(), 0.0, 4.0, 2)
    assert read_png_params(strip.strip)["vary"] == {"lambda_fine": [0.0, 4.0]}
    with pytest.raises(ValueError) as e:
        h.render_edit(m, outputs, sample(**kw), edit(lambda_coarse=0.5))
    assert h.describe(e.value) == (
        "FluxSpace's coarse edit (lambda_coarse) moves the pooled text vector, and this model has none (FLUX.2 "
        "modulates by time and guidance only): set lambda_coarse=0 and edit with the fine edit"
    )
    real = h.RealControls(str(r.original))
    for run in (h.render_inversion, lambda mm, o, s, c: h.render_real_edit(mm, o, s, edit(), c)):
        with pytest.raises(ValueError) as e:
            run(m, outputs, sample(**kw), real)
        assert h.describe(e.value) == (
            "inverting a real image runs on FLUX.1 models only; FLUX.2 takes an image as a reference image "
            "(--image on generate, edit and sweep; image= in Python) instead"
        )


def test_conditioning_images_on_flux2_and_kontext(flux2_models, tiny_checkpoint, models, outputs, tmp_path):
    """The generated tab's conditioning images: FLUX.2 references (optional, any number), Kontext's one image
    to edit (required); a text-to-image model refuses them. A plain run is reused only for the same images."""
    from fluxspace import load_models
    from fluxspace.editing import PlainRuns

    kw = dict(width=64, height=64, steps=2)
    upload = tmp_path / "photo.png"  # an upload
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (72, 100, 3), dtype=np.uint8)).save(upload)
    runs = PlainRuns()
    plain = h.render_edit(flux2_models, outputs, sample(**kw), edit(), plain_runs=runs)
    ref = h.render_edit(flux2_models, outputs, sample(**kw, images=(str(upload),)), edit(), plain_runs=runs)
    assert runs.hits == 0  # another image, another plain run
    assert not np.array_equal(pixels(plain.original), pixels(ref.original))
    assert read_png_params(ref.edited)["image_path"] == [upload.name]
    again = h.render_edit(flux2_models, outputs, sample(**kw, images=(str(upload),)), edit(h.ConceptRow("glasses", 2.0)),
                          plain_runs=runs)  # fmt: skip
    assert runs.hits == 1 and np.array_equal(pixels(again.original), pixels(ref.original))
    strip = h.render_strip(flux2_models, outputs, sample(**kw, images=(str(upload),)), edit(), 0.0, 4.0, 2)
    assert read_png_params(strip.strip)["image_path"] == [upload.name]

    kontext = load_models(tiny_checkpoint.transformer, preset="tiny-kontext")
    r = h.render_edit(kontext, outputs, sample(prompt="add glasses", **kw, images=(str(upload),)), edit())
    assert Image.open(r.edited).size == (64, 64)
    for images, message in [((), "tiny-kontext edits one image by instruction; upload exactly one image to condition "
                                 "on (got 0)")]:  # fmt: skip
        with pytest.raises(ValueError) as e:
            h.render_edit(kontext, outputs, sample(prompt="add glasses", **kw, images=images), edit())
        assert h.describe(e.value) == message
    with pytest.raises(ValueError) as e:
        h.render_edit(models, outputs, sample(images=(str(upload),)), edit())
    assert h.describe(e.value) == ("tiny draws from text only: images to condition on are for Kontext and FLUX.2 "
                                   "models (edit a real image in the real-image tab)")  # fmt: skip


def test_outputs_keep_the_latest_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(h, "KEPT_RENDERS", 2)
    o = h.Outputs(tmp_path / "o")
    made = [o.folder() for _ in range(4)]
    assert [p.exists() for p in made] == [False, False, True, True]


def test_describe_names_unexpected_errors():
    assert h.describe(ValueError("bad value\nmore")) == "bad value"
    assert h.describe(FileNotFoundError(2, "No such file or directory", "x.png")) == "No such file or directory: x.png"
    assert h.describe(ZeroDivisionError("division by zero")) == "internal error: ZeroDivisionError: division by zero"


# ----------------------------------------------------------------------------------------------
# The page's handlers, called as Gradio calls them (no browser, no server)


@pytest.fixture
def page(models, tmp_path):
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from fluxspace.app.page import build

    return build(models, h.Outputs(tmp_path / "page"))


def values(page, **changes) -> list:
    """The page's input values as Gradio passes them, from the components' values, with changes by elem_id."""
    out = []
    for component in page.sample_inputs + page.edit_inputs:
        key = getattr(component, "elem_id", None)
        value = component.value if hasattr(component, "value") else None
        out.append(changes.get(key, value))
    out[len(page.sample_inputs)] = changes.get("n", 1)  # the concept count (a gr.State)
    return out


def test_page_render_and_error_paths(page):
    v = values(page, prompt="a smiling woman", width=64, height=48, steps=3, **{"concept-0": "glasses", "lambda-0": 3})
    sample_c, edit_c, rest = page._split(tuple(v))
    defaults = page.models.sample_settings(None)
    assert sample_c == h.SampleControls("a smiling woman", 0, 64, 48, 3, defaults.guidance, 1.0, "")
    assert edit_c.concepts == (h.ConceptRow("glasses", 3, 0.5, ""),) and rest == []
    original, edited, *overlays, files, status = page.on_render(*v)
    assert read_png_params(edited)["edit"]["concepts"][0]["lambda_fine"] == 3
    assert overlays[0]["value"] == files[3] and overlays[0]["label"].startswith("mask: glasses")
    assert [u["visible"] for u in overlays] == [True, False, False, False]
    assert status.startswith("edited in 3 steps")
    # A slider move samples only the edited branch: the plain run is the page's from before.
    moved = values(page, prompt="a smiling woman", width=64, height=48, steps=3, **{"concept-0": "glasses", "lambda-0": -2})
    hits = page.plain_runs.hits
    assert page.on_live(*moved)[-1].endswith("glasses -2") and page.plain_runs.hits == hits + 1
    # A bad value changes no output and says what was wrong.
    bad = values(page, prompt="a smiling woman", width=50, height=48, steps=3, **{"concept-0": "glasses"})
    out = page.on_render(*bad)
    assert out[:-1] == [page_skip()] * (len(out) - 1) and out[-1] == "**error:** width 50 is not a multiple of 16; nearest valid: 48 or 64"
    # An unexpected failure is a message too, and the page keeps working.
    page.outputs.folder = lambda: 1 / 0
    out = page.on_render(*v)
    assert out[-1] == "**error:** internal error: ZeroDivisionError: division by zero"
    del page.outputs.folder
    assert page.on_render(*v)[-1].startswith("edited in 3 steps")


def page_skip():
    import gradio as gr

    return gr.skip()


def test_page_concept_rows_strip_inversion_and_restore(page, render_png):
    seeds = {page.on_dice() for _ in range(20)}
    assert len(seeds) > 1 and all(isinstance(x, int) and 0 <= x < 2**31 for x in seeds)
    assert page.on_show_masks(True)["visible"] is True and page.on_show_masks(False)["visible"] is False
    n, *updates = page.on_concepts(1, 1)
    assert n == 2 and [u["visible"] for u in updates] == [True, True, False, False]
    assert page.on_concepts(h.MAX_CONCEPTS, 1)[0] == h.MAX_CONCEPTS and page.on_concepts(1, -1)[0] == 1
    v = values(page, prompt="a smiling woman", width=64, height=48, steps=3, n=2,
               **{"concept-0": "glasses", "concept-1": "hat", "lambda-1": -2})  # fmt: skip
    strip, files, status = page.on_strip(*v, 0.0, 4.0, 3)
    assert read_png_params(strip)["vary"] == {"lambda_fine": [0.0, 2.0, 4.0]}
    real_input, reconstruction, psnr, files, status = page.on_invert(*v, str(render_png), "euler", "resize", None)
    assert psnr.startswith("**PSNR ") and status.startswith("reconstruction PSNR")
    real_original, real_edited, _, files, status = page.on_real_edit(*v, str(render_png), "euler", "resize", None)
    assert read_png_params(real_edited)["image_path"] == "original.png"
    # Restoring the real edit's PNG sets every control, the concept rows' visibility and the solver.
    out = page.on_restore(real_edited)
    n_sample, n_edit = len(page.sample_inputs), len(page.edit_inputs)
    assert out[0] == "a smiling woman" and out[n_sample] == 2
    assert out[n_sample + 1 : n_sample + 9] == ["glasses", 5.0, 0.5, "", "hat", -2, 0.5, ""]
    assert [u["visible"] for u in out[n_sample + n_edit : n_sample + n_edit + h.MAX_CONCEPTS]] == [True, True, False, False]
    assert out[-2] == "euler" and out[-1].startswith("restored the settings of edited.png")
    assert page.on_restore(None)[-1] == "**error:** no PNG given; drop a PNG written by fluxspace"


def test_app_command_refusals(capsys):
    with pytest.raises(SystemExit) as e:
        main(["app", "--port", "70000"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "fluxspace: error: --port must be in [1, 65535]; got 70000\n"
    with pytest.raises(SystemExit):
        main(["app", "--device", "tpu"])
    assert "--device 'tpu' is not a device" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use: refused before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit):
            main(["app", "--port", str(port)])
    assert capsys.readouterr().err == (f"fluxspace: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
                                       "choose another --port or --host\n")  # fmt: skip


def test_page_on_flux2_shows_and_passes_reference_images(flux2_models, page, tmp_path):
    """The page's conditioning-image box: hidden for a text-to-image model, shown for FLUX.2, its uploads
    (as Gradio passes a multiple-file box: a list of paths) reaching the render."""
    from fluxspace.app.page import build

    assert page.condition.visible is False
    flux2_page = build(flux2_models, h.Outputs(tmp_path / "flux2-page"))
    assert flux2_page.condition.visible is True and flux2_page.condition.label == "reference images (optional)"
    assert page.lambda_coarse.visible is True and flux2_page.lambda_coarse.visible is False  # no pooled vector
    upload = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(upload)
    v = values(flux2_page, prompt="a smiling woman", width=64, height=64, steps=2, condition=[str(upload)],
               **{"concept-0": "glasses"})  # fmt: skip
    assert flux2_page._split(tuple(v))[0].images == (str(upload),)
    *_, files, status = flux2_page.on_render(*v)
    assert status.startswith("edited in 2 steps at 64x64 px") and read_png_params(files[1])["image_path"] == ["ref.png"]
