"""What the editor's controls do, without a browser: control values in, images and metadata out.

Each handler builds the library's own objects (EditSpec, SampleSettings, InversionSettings) through
the parsing and validation the CLI uses (arguments.py, grammar.py, spec.validate,
SampleSettings.resolve), calls edit_image / sweep / invert_image, and writes the PNGs a page shows
and offers for download, with the same `fluxspace` metadata as the CLI's (cli.edit_params). A bad
value raises a ValueError with one line saying what was wrong; `describe` turns any exception into
the line the page shows. No Gradio here (page.py wires these to the page).
"""

import dataclasses
import math
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from flux_core.atomic import FileSet

from ..arguments import SEED_RANGE, SPEC_ARGS
from ..cli import edit_params, error_message, mask_names
from ..editing import EditResult, PlainRuns, edit_image, mask_overlay
from ..images import read_png_params, save_png, side_by_side
from ..inversion import FITS, InversionSettings, fit_image, invert_image, read_image
from ..metadata import run_metadata
from ..models import FluxModels
from ..settings import SampleSettings
from ..spec import Concept, EditSpec, validate
from ..sweep import sweep

MAX_CONCEPTS = 4  # concept rows on the page
STRIP_COUNTS = (2, 9)  # images in a lambda strip: at least, at most
KEPT_RENDERS = 64  # output folders kept on disk; older ones are removed (the page shows the latest)

# The inversion choices of the real-image tab: the CLI's --solver / --fireflow / --gamma --eta, with
# RF-Inversion at the settings of the README's table (benchmarks/inversion.py).
SOLVERS = {
    "euler": InversionSettings(),
    "midpoint (RF-Solver)": InversionSettings(solver="midpoint"),
    "midpoint + FireFlow reuse": InversionSettings(solver="midpoint", reuse=True),
    "RF-Inversion (gamma 0.5, eta 0.9)": InversionSettings(gamma=0.5, eta=0.9, eta_stop=0.25),
}


@dataclass(frozen=True)
class ConceptRow:
    """One concept row of the page: edit prompt, lambda_fine slider, tau_m slider, mask words."""

    prompt: str = ""
    lambda_fine: float = Concept.lambda_fine
    tau_m: float = Concept.tau_m
    mask_words: str = ""  # comma-separated words of the edit prompt; empty: the whole prompt


@dataclass(frozen=True)
class EditControls:
    """Every EditSpec control of the page, as the page holds them (text where the CLI takes text)."""

    concepts: tuple[ConceptRow, ...] = ()
    lambda_coarse: float = 0.0
    coarse_prompt: str = ""  # empty: the concepts' prompts joined (EditSpec.coarse_prompt None)
    start: str = "0"  # a step index (2) or a time in [0, 1] (0.8), as --start
    end: str = ""  # empty: until the end
    blocks: str = ""  # "0-9", "0,3,5"; empty: all double blocks
    prior: str = ""
    projection: str = EditSpec.projection
    coarse_target: str = EditSpec.coarse_target
    prior_removal: str = EditSpec.prior_removal
    reference: bool = False


@dataclass(frozen=True)
class SampleControls:
    """The sampling controls: prompt, seed, size, steps, guidance, true CFG (None: the preset's)."""

    prompt: str
    seed: int | float | None = 0
    width: int | float | None = None
    height: int | float | None = None
    steps: int | float | None = None
    guidance: float | None = None
    cfg_scale: float | None = None
    negative_prompt: str = ""
    images: tuple[str, ...] = ()  # conditioning images (Kontext: the image to edit; FLUX.2: references)


@dataclass
class Rendered:
    """What one request produced: the images as PNG files (with metadata), and what the page shows."""

    files: list[Path]  # every PNG written, for the download box
    original: Path | None = None
    edited: Path | None = None
    overlays: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # (mask overlay PNG, concept)
    strip: Path | None = None
    psnr: float | None = None
    message: str = ""


def describe(e: BaseException) -> str:
    """One line for the page: our errors as they are, anything else named as an internal error."""
    line = error_message(e)
    if isinstance(e, ValueError | OSError | MemoryError | LookupError):
        return line
    return f"internal error: {type(e).__name__}: {line}"


# ----------------------------------------------------------------------------------------------
# Controls -> the library's objects


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value != int(value):
        raise ValueError(f"{name} must be a whole number; got {value!r}")
    value = int(value)
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be in [{low}, {high - 1 if high else '...'}]; got {value}")
    return value


def seed_from(value) -> int:
    """The seed box: an integer in [0, 2^64), as --seed."""
    return _integer("seed", value, 0, SEED_RANGE)


def settings_from(models: FluxModels, c: SampleControls, *, real_image: bool = False) -> SampleSettings:
    """The sampling settings, the preset's defaults filled in and checked for this model (size, steps)."""
    def whole(name):
        value = getattr(c, name)
        return None if value is None else _integer(name, value, 1)

    s = SampleSettings(width=whole("width"), height=whole("height"), steps=whole("steps"), guidance=c.guidance,
                       cfg_scale=c.cfg_scale, negative_prompt=c.negative_prompt or "")  # fmt: skip
    return models.sample_settings(s, real_image=real_image)


def concept_from(row: ConceptRow) -> Concept:
    words = tuple(w.strip() for w in row.mask_words.split(",") if w.strip())
    return Concept(row.prompt.strip(), float(row.lambda_fine), float(row.tau_m), words or None)


def spec_from(c: EditControls) -> EditSpec:
    """The EditSpec of the edit controls; start, end and blocks go through the CLI's grammars."""
    start = SPEC_ARGS["start"].parse(c.start) if c.start.strip() else 0
    end = SPEC_ARGS["end"].parse(c.end) if c.end.strip() else None
    blocks = SPEC_ARGS["blocks"].parse(c.blocks) if c.blocks.strip() else None
    return EditSpec(
        concepts=tuple(concept_from(row) for row in c.concepts), lambda_coarse=float(c.lambda_coarse),
        coarse_prompt=c.coarse_prompt.strip() or None, start=start, end=end, blocks=blocks,
        prior_prompt=c.prior, projection=c.projection, coarse_target=c.coarse_target,
        prior_removal=c.prior_removal, reference=bool(c.reference),
    )  # fmt: skip


def checked_spec(models: FluxModels, c: EditControls, settings: SampleSettings) -> EditSpec:
    spec = spec_from(c)
    validate(spec, num_steps=settings.steps, num_double_blocks=models.params.depth)
    return spec


# ----------------------------------------------------------------------------------------------
# Where the PNGs go


class Outputs:
    """A folder per request under one root; the oldest are removed beyond KEPT_RENDERS."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fluxspace-app-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.made: deque[Path] = deque()
        self.count = 0

    def folder(self) -> Path:
        self.count += 1
        folder = self.root / f"{self.count:06d}"
        folder.mkdir()
        self.made.append(folder)
        while len(self.made) > KEPT_RENDERS:
            shutil.rmtree(self.made.popleft(), ignore_errors=True)
        return folder


def _write(folder: Path, images: list[Image.Image], names: list[str], params: dict, roles: list[str]) -> list[Path]:
    """The images as one set of PNGs (all or none, flux_core.atomic.FileSet), each with its role."""
    with FileSet() as outputs:
        for image, name, role in zip(images, names, roles, strict=True):
            save_png(image, folder / name, {**params, "image": role}, outputs)
    return [folder / name for name in names]


def _edit_files(folder: Path, result: EditResult, params: dict) -> Rendered:
    """original, edited, side by side and one mask overlay per concept, as the CLI's `edit` writes them."""
    spec = result.spec
    names = ["original.png", "edited.png", "side_by_side.png", *mask_names(spec)]
    images = [result.original, result.edited, side_by_side([result.original, result.edited])]
    images += [mask_overlay(result.original, mask) for mask in result.masks]
    roles = ["original", "edited", "side_by_side", *(f"mask {c.prompt}" for c in spec.concepts)]
    files = _write(folder, images, names, params, roles)
    overlays = [(path, c.prompt) for path, c in zip(files[3:], spec.concepts, strict=True)]
    return Rendered(files, original=files[0], edited=files[1], overlays=overlays)


# ----------------------------------------------------------------------------------------------
# The requests


def conditioning(models: FluxModels, sample: SampleControls) -> list[str] | str | None:
    """The images a conditioning model's runs take (Kontext: exactly one, the image to edit; FLUX.2: any
    number of references), checked; a text-to-image model takes none (its real images are the other tab's)."""
    images = [str(p) for p in sample.images]
    if models.family == "flux2":
        return images or None
    if models.preset.kontext:
        if len(images) != 1:
            raise ValueError(f"{models.preset.name} edits one image by instruction; upload exactly one image to "
                             f"condition on (got {len(images)})")  # fmt: skip
        return images[0]
    if images:
        raise ValueError(f"{models.preset.name} draws from text only: images to condition on are for Kontext and "
                         "FLUX.2 models (edit a real image in the real-image tab)")  # fmt: skip
    return None


def image_params(sample: SampleControls) -> dict:
    """What the PNGs record of the conditioning images: their file names."""
    return {"image_path": [Path(p).name for p in sample.images]} if sample.images else {}


def render_edit(models: FluxModels, outputs: Outputs, sample: SampleControls, edit: EditControls,
                progress: bool = False, plain_runs: PlainRuns | None = None) -> Rendered:  # fmt: skip
    """A generated image, unedited and edited from the same noise, with the concepts' mask overlays.
    progress: show the sampler's progress bars (tqdm), which the page can follow. plain_runs: the
    page's recent plain runs (editing.PlainRuns): a slider move then samples only the edited branch."""
    if not sample.prompt.strip():
        raise ValueError("the prompt is empty; describe the image to generate")
    seed = seed_from(sample.seed)
    settings = settings_from(models, sample)
    spec = checked_spec(models, edit, settings)
    result = edit_image(models, sample.prompt, spec, seed=seed, settings=settings, progress=progress,
                        plain_runs=plain_runs, image=conditioning(models, sample))
    r = _edit_files(outputs.folder(), result, edit_params(result, models) | image_params(sample))
    strengths = ", ".join(f"{c.prompt} {c.lambda_fine:g}" for c in spec.concepts)
    r.message = f"edited in {settings.steps} steps at {settings.width}x{settings.height} px, seed {seed}: {strengths}"
    return r


def render_strip(models: FluxModels, outputs: Outputs, sample: SampleControls, edit: EditControls,
                 low: float, high: float, count) -> Rendered:  # fmt: skip
    """A labelled strip over lambda_fine from `low` to `high` (every concept at once), from one noise."""
    count = _integer("the strip's image count", count, STRIP_COUNTS[0], STRIP_COUNTS[1] + 1)
    if not all(math.isfinite(float(v)) for v in (low, high)):
        raise ValueError(f"the strip's lambda range must be finite numbers; got {low!r} to {high!r}")
    if not sample.prompt.strip():
        raise ValueError("the prompt is empty; describe the image to generate")
    seed = seed_from(sample.seed)
    settings = settings_from(models, sample)
    spec = checked_spec(models, edit, settings)
    if not spec.concepts:
        raise ValueError("a lambda strip needs at least one concept")
    values = [round(low + (high - low) * k / (count - 1), 4) for k in range(count)]
    grid, results = sweep(models, sample.prompt, spec, [("lambda_fine", values)], seed=seed, settings=settings,
                          progress=True, image=conditioning(models, sample))  # fmt: skip
    params = {**edit_params(results[0][0], models, "sweep"), **image_params(sample), "vary": {"lambda_fine": values}}
    (path,) = _write(outputs.folder(), [grid], ["strip.png"], params, ["strip"])
    return Rendered([path], strip=path, message=f"lambda_fine = {', '.join(map(str, values))}")


@dataclass(frozen=True)
class RealControls:
    """The real-image tab: the upload, how it is fitted, and how it is inverted."""

    path: str | None
    solver: str = "euler"
    fit: str = "resize"
    size: int | float | None = None  # the longer side is resized to this first (None: kept)


def _real_image(models: FluxModels, c: RealControls) -> tuple[Image.Image, InversionSettings]:
    """The upload read (at most inversion.MAX_IMAGE_PIXELS, judged by its header) and fitted to the token grid."""
    if not c.path:
        raise ValueError("no image uploaded; drop a PNG or JPEG on the upload box first")
    if c.solver not in SOLVERS:
        raise ValueError(f"unknown solver {c.solver!r}; valid: {', '.join(SOLVERS)}")
    if c.fit not in FITS:
        raise ValueError(f"unknown fit {c.fit!r}; valid: {', '.join(FITS)}")
    image = read_image(c.path)
    if c.size is not None:
        image = fit_image(image, 1, "resize", _integer("size", c.size, 1, 4097))
    return fit_image(image, models.pixels_per_token, c.fit), SOLVERS[c.solver]


def _real_settings(models: FluxModels, sample: SampleControls) -> SampleSettings:
    """The size comes from the image, and true CFG is off (it pulls the reconstruction off the image; the
    CLI's default for real images too): the page's CFG box is for generated images."""
    return settings_from(models, replace(sample, width=None, height=None, cfg_scale=None), real_image=True)


def _real_params(c: RealControls, inversion: InversionSettings) -> dict:
    return {"image_path": Path(c.path).name, "inversion": dataclasses.asdict(inversion), "fit": c.fit}


def render_inversion(models: FluxModels, outputs: Outputs, sample: SampleControls, real: RealControls) -> Rendered:
    """Invert the upload and reconstruct it; the PSNR says how faithful the chosen solver is."""
    image, inversion = _real_image(models, real)
    seed = seed_from(sample.seed)
    settings = _real_settings(models, sample)
    r = invert_image(models, image, sample.prompt, settings=settings, inversion=inversion, seed=seed)
    params = run_metadata("invert", models, r.settings, prompt=sample.prompt, seed=seed, psnr_db=r.psnr,
                          evaluations=r.evaluations, **_real_params(real, inversion))  # fmt: skip
    files = _write(outputs.folder(), [r.image, r.reconstruction], ["input.png", "reconstruction.png"], params,
                   ["input", "reconstruction"])  # fmt: skip
    message = (f"reconstruction PSNR {r.psnr:.2f} dB at {r.image.width}x{r.image.height} px, {r.settings.steps} "
               f"steps, {r.evaluations} transformer evaluations ({real.solver})")  # fmt: skip
    return Rendered(files, original=files[0], edited=files[1], psnr=r.psnr, message=message)


def render_real_edit(models: FluxModels, outputs: Outputs, sample: SampleControls, edit: EditControls,
                     real: RealControls) -> Rendered:  # fmt: skip
    """Edit the upload: inverted, then sampled back with the edit; `original` is the reconstruction."""
    image, inversion = _real_image(models, real)
    seed = seed_from(sample.seed)
    settings = _real_settings(models, sample)
    spec = checked_spec(models, edit, settings)
    result = edit_image(models, sample.prompt, spec, seed=seed, settings=settings, image=image, inversion=inversion)
    r = _edit_files(outputs.folder(), result, {**edit_params(result, models), **_real_params(real, inversion)})
    r.message = f"edited the upload through inversion ({real.solver}, {result.settings.steps} steps)"
    return r


# ----------------------------------------------------------------------------------------------
# A fluxspace PNG -> the controls that made it


@dataclass(frozen=True)
class Restored:
    """The controls a PNG's metadata sets; None where it records nothing (the control is left as it is)."""

    sample: SampleControls
    edit: EditControls | None
    solver: str | None  # the real-image tab's solver, for PNGs made through inversion
    message: str


def _text(value) -> str:
    """A start/end/blocks value as the page's text box holds it (an int step stays an int, a time a float)."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def restore(path: str | None) -> Restored:
    """Read the `fluxspace` metadata of a PNG written by the CLI or this page back into controls."""
    if not path:
        raise ValueError("no PNG given; drop a PNG written by fluxspace")
    try:
        params = read_png_params(path)
    except (OSError, ValueError, SyntaxError) as e:  # not a PNG, or its metadata is not our JSON
        raise ValueError(f"cannot read settings from {Path(path).name}: {error_message(e)}") from None
    if not params or "prompt" not in params:
        raise ValueError(f"{Path(path).name} holds no fluxspace settings (a PNG written by fluxspace has a "
                         "'fluxspace' metadata chunk)")  # fmt: skip
    sample = SampleControls(
        prompt=params.get("prompt") or "", seed=params.get("seed", 0), width=params.get("width"),
        height=params.get("height"), steps=params.get("steps"), guidance=params.get("guidance"),
        cfg_scale=params.get("cfg_scale"), negative_prompt=params.get("negative_prompt") or "",
    )  # fmt: skip
    edit = None
    if isinstance(params.get("edit"), dict):
        e = params["edit"]
        concepts = e.get("concepts") or []
        if len(concepts) > MAX_CONCEPTS:
            raise ValueError(f"{Path(path).name} has {len(concepts)} concepts; this page takes at most {MAX_CONCEPTS}")
        rows = tuple(ConceptRow(c["prompt"], c["lambda_fine"], c["tau_m"], ", ".join(c.get("mask_words") or ()))
                     for c in concepts)  # fmt: skip
        edit = EditControls(
            concepts=rows, lambda_coarse=e.get("lambda_coarse", 0.0), coarse_prompt=e.get("coarse_prompt") or "",
            start=_text(e.get("start", 0)), end=_text(e.get("end")), blocks=_text(e.get("blocks")),
            prior=e.get("prior_prompt", ""), projection=e.get("projection", EditSpec.projection),
            coarse_target=e.get("coarse_target", EditSpec.coarse_target),
            prior_removal=e.get("prior_removal", EditSpec.prior_removal), reference=bool(e.get("reference")),
        )  # fmt: skip
    solver = None
    if isinstance(params.get("inversion"), dict):
        try:
            inversion = InversionSettings(**params["inversion"])
        except TypeError:  # written by another version: the solver box is left as it is
            inversion = None
        solver = next((name for name, s in SOLVERS.items() if s == inversion), None)
    what = f"{params.get('command', 'a')} PNG" + (f", {len(edit.concepts)} concept(s)" if edit else "")
    return Restored(sample, edit, solver, f"restored the settings of {Path(path).name} ({what})")
