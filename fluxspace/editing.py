"""Prompt + edit -> the unedited and the edited image from the same noise, and the masks.

    models = load_models("path/to/model")
    result = edit_image(models, "a portrait of a man", EditSpec(concepts=(Concept("eyeglasses"),)), seed=0)
    result.original, result.edited, result.masks

The steps before the edit switches on are the same in both runs, so the edited run starts from the
plain run's latent at that step instead of computing them again (run.py: SamplingRun).
"""

import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flux_core import EditSchedule
from flux_core.recorder import Recorder

from .models import FluxModels
from .run import SamplingRun
from .settings import SampleSettings
from .spec import EditSpec, encode_edit, validate
from .step import FluxSpaceSchedule

MASK_COLOUR = (255, 40, 40)


@dataclass
class EditResult:
    original: Image.Image
    edited: Image.Image
    masks: list[torch.Tensor]  # per concept (H/16, W/16): share of edited blocks x steps with the token in the mask
    spec: EditSpec
    settings: SampleSettings  # resolved: steps and guidance filled in from the preset
    seed: int
    prompt: str
    recorder: Recorder | None = None
    block_masks: list | None = None  # with record=True: (step, double block, [per concept (1, N)]) entries


@dataclass
class PlainRuns:
    """The plain runs of recent edits, so that an edit that differs from an earlier one only in the
    edit itself (a strength, a mask, a concept: an editor's slider) samples only its edited branch.

    Keyed on everything the plain run depends on: prompt, seed, resolved settings, LoRA strengths and the step where
    the edit branches off (the plain run's latent there is kept too). Valid for one model as loaded:
    make a new one if its weights change. Holds at most `size` runs (latents only: N x C floats each).
    """

    size: int = 8
    runs: OrderedDict = field(default_factory=OrderedDict)
    hits: int = 0

    def get(self, key):
        if key in self.runs:
            self.runs.move_to_end(key)
            self.hits += 1
        return self.runs.get(key)

    def put(self, key, value) -> None:
        self.runs[key] = value
        self.runs.move_to_end(key)
        while len(self.runs) > self.size:
            self.runs.popitem(last=False)


class Recorded:
    """An edit schedule followed by a recorder on the same seam: the recorder keeps what the edit
    returned, and records the plain steps too (flux_core.seam.EditSchedule)."""

    def __init__(self, schedule: EditSchedule, recorder: Recorder):
        self.schedule, self.recorder = schedule, recorder

    def at_step(self, step: int, t: float, num_steps: int):
        edit = self.schedule.at_step(step, t, num_steps)
        return self.recorder if edit is None else _RecordedEdit(edit, self.recorder)


class _RecordedEdit:
    """One forward's edit, then the recorder (flux_core.seam.Edit)."""

    def __init__(self, edit, recorder: Recorder):
        self.edit, self.recorder = edit, recorder

    def vectors(self, model, vec, timesteps, y, guidance):
        self.recorder.vectors(model, vec, timesteps, y, guidance)
        return self.edit.vectors(model, vec, timesteps, y, guidance)

    def double_block(self, site):
        return self.recorder.double_block(site.with_outputs(*self.edit.double_block(site)))

    def single_block(self, site):
        return self.recorder.single_block(site.with_attention(self.edit.single_block(site)))


def edit_image(
    models: FluxModels,
    prompt: str,
    spec: EditSpec,
    seed: int = 0,
    settings: SampleSettings | None = None,
    *,
    record: bool = False,
    progress: bool = True,
    image=None,
    inversion=None,
    fit: str = "resize",
    plain_runs: PlainRuns | None = None,
) -> EditResult:
    """Generate `prompt` from `seed` twice, plain and with the FluxSpace edit `spec`.

    record=True also returns a Recorder with every block's attention output during the edited steps,
    and every double block's concept masks (`block_masks`).
    image: on a Kontext model, the image it edits by the instruction `prompt` (no inversion: the
    image conditions both runs); on FLUX.2, reference images (one or a list), likewise. On a
    text-to-image model, edit a real image instead (a path or PIL image): it is inverted (inversion:
    an inversion.InversionSettings) and `original` is its reconstruction, `edited` the reverse pass
    with the edit; the size comes from the image (fit: "resize" or "crop" to the token grid), `seed`
    is RF-Inversion's target noise, and true CFG is off unless settings.cfg_scale asks for it.
    plain_runs: reuse the plain run of an earlier call with the same prompt, seed, settings, branch
    step and conditioning image files (PlainRuns; not for real images, nor images given as
    pictures): the images are the same, sampled in about half the time when the edit is on from the
    first step.
    Everything is validated before any sampling starts.
    """
    flux2 = models.family == "flux2"
    conditioned = models.preset.kontext or flux2  # the image conditions both runs (FLUX.2: references)
    if image is not None and not conditioned:
        return _edit_real_image(models, prompt, spec, seed, settings, image, inversion, fit, record)
    if inversion is not None and conditioned:  # the model conditions on image= as it is: nothing to invert
        from .inversion import NO_FLUX2_INVERSION

        raise ValueError(NO_FLUX2_INVERSION if flux2 else f"{models.preset.name} edits an image by instruction (the "
                         "image conditions the run), without inversion: inversion settings do not apply")  # fmt: skip
    if inversion is not None:
        raise ValueError("inversion settings need image= (the real image to invert)")
    s = models.sample_settings(settings)
    validate(spec, num_steps=s.steps, num_double_blocks=models.params.depth, pooled_text=not flux2)
    encoded = encode_edit(spec, models.text)  # also checks that the mask words are in the edit prompts
    run = SamplingRun.prepare(models, [prompt], [seed], settings, progress=progress,
                              image=image if conditioned else None)  # fmt: skip
    s = run.settings

    start = run.first_active_step(spec)
    # unfused LoRA strengths change the run, and so do the conditioning images
    key = (prompt, seed, s, start, tuple(models.loras.scales.values()), _image_key(image))
    cached = plain_runs is not None and key[-1] is not None
    known = plain_runs.get(key) if cached else None
    plain, branch = known if known is not None else run.plain_and_branch(start)
    if cached:
        plain_runs.put(key, (plain, branch))
    # Kontext, FLUX.2 references: the generated image's tokens are edited, the conditioning ones follow
    n_generated = run.inp.img.shape[1] if run.condition is not None else None
    schedule = FluxSpaceSchedule(spec, encoded, keep_masks=record, n_generated=n_generated)
    recorder = Recorder(keep=("img_attn_out", "attn")) if record else None
    if start is None:  # the edit never switches on: the edited image is the plain one
        edited = plain.clone()
    else:
        velocity = run.velocity(schedule if recorder is None else Recorded(schedule, recorder), offset=start)
        edited = run.branch(start, branch, velocity)

    original, edited_image = run.decode(plain, edited)
    masks = schedule.mean_masks(models.token_grid(s.width, s.height))
    block_masks = schedule.masks.entries if record else None
    return EditResult(original, edited_image, masks, spec, s, seed, prompt, recorder, block_masks)


def _image_key(image):
    """What a plain run's cache key holds of its conditioning images: () without any, else the files' paths
    and modification times; None (not cached) for images given as pictures, which have no such identity."""
    if image is None:
        return ()
    images = image if isinstance(image, list | tuple) else [image]
    if not all(isinstance(i, str | os.PathLike) for i in images):
        return None
    return tuple((str(i), os.stat(i).st_mtime_ns) for i in images)


def _edit_real_image(models, prompt, spec, seed, settings, image, inversion, fit, record) -> EditResult:
    from .inversion import InversionSettings, invert_image

    if record:
        raise ValueError("record=True is not available for real images yet")
    r = invert_image(models, image, prompt, settings=settings, inversion=inversion or InversionSettings(), fit=fit,
                     seed=seed, edit_spec=spec)  # fmt: skip
    return EditResult(r.reconstruction, r.edited, r.masks, spec, r.settings, seed, prompt)


def mask_overlay(image: Image.Image, mask: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The image tinted red where `mask` (h, w), values in [0, 1], upsampled to the image size, is on."""
    m = F.interpolate(mask[None, None].float(), size=(image.height, image.width), mode="nearest")[0, 0, ..., None]
    base = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # (H, W, 3)
    tint = torch.tensor(MASK_COLOUR, dtype=torch.float32)
    out = base * (1 - alpha * m) + tint * (alpha * m)
    return Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).numpy())
