"""Prompt + edit -> the unedited and the edited image from the same noise, and the masks.

    models = load_models("path/to/model")
    result = edit_image(models, "a portrait of a man", EditSpec(concepts=(Concept("eyeglasses"),)), seed=0)
    result.original, result.edited, result.masks

The steps before the edit switches on are the same in both runs, so the edited run starts from the
plain run's latent at that step instead of computing them again.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flux_core.recorder import Recorder
from flux_core.sampling import ModelInputs, denoise, get_noise, get_schedule, prepare, unpack

from .edit import EditSpec, encode_edit, validate
from .pipeline import FluxModels, SampleSettings, decode
from .step import FluxSpaceEditor

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
class SamplingRun:
    """One prompt and seed made ready to sample: model inputs, schedule, negative prompt.

    Shared by edit_image and the baselines (baselines.py), which all compare a plain run with an
    edited run from the same noise, the edited one branching off the plain one where the edit starts.
    """

    models: FluxModels
    settings: SampleSettings  # resolved
    inp: ModelInputs
    timesteps: list[float]
    negative: tuple[torch.Tensor | None, torch.Tensor | None]  # (neg_txt, neg_vec), or Nones without CFG
    progress: bool

    @classmethod
    def prepare(cls, models: FluxModels, prompt: str, seed: int, s: SampleSettings, progress: bool) -> "SamplingRun":
        txt, vec = models.text([prompt])  # (1, T, C'), (1, C'')
        z, ppt = models.ae.params.z_channels, models.pixels_per_token
        noise = get_noise(1, s.height, s.width, seed=[seed], z_channels=z, device=models.device, pixels_per_token=ppt)
        inp = prepare(noise if s.parity else noise.to(models.dtype), txt, vec)
        timesteps = get_schedule(s.steps, inp.img.shape[1], shift=models.preset.shift_schedule)
        negative = models.text([s.negative_prompt]) if s.cfg_scale != 1.0 else (None, None)
        return cls(models, s, inp, timesteps, negative, progress)

    def denoise(self, x, timesteps, edit=None, callback=None, model=None, txt=None, vec=None) -> torch.Tensor:
        """Euler from latent x over `timesteps` (default: the prompt's model, txt and vec)."""
        s, inp = self.settings, self.inp
        return denoise(
            self.models.flow if model is None else model, x.to(inp.img.dtype), inp.img_ids, inp.txt if txt is None else txt,
            inp.txt_ids, inp.vec if vec is None else vec, timesteps, guidance=s.guidance, neg_txt=self.negative[0],
            neg_vec=self.negative[1], cfg_scale=s.cfg_scale, progress=self.progress, parity=s.parity, edit=edit,
            callback=callback,
        )  # fmt: skip

    def with_prompt(self, prompt: str, negative_prompt: str | None = None) -> torch.Tensor:
        """The whole run again from the same noise with another prompt (and optionally another CFG negative)."""
        txt, vec = self.models.text([prompt])
        negative = self.negative
        if negative_prompt is not None:
            if self.settings.cfg_scale == 1.0:
                raise ValueError("a negative prompt needs true CFG (cfg_scale != 1)")
            negative = self.models.text([negative_prompt])
        run = dataclasses.replace(self, negative=negative)
        return run.denoise(self.inp.img, self.timesteps, txt=txt.to(self.inp.txt), vec=vec.to(self.inp.vec))

    def plain_and_branch(self, start: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The plain run's final latent, and its latent where step `start` begins (None: no branch)."""
        branch = {0: self.inp.img}

        def keep_branch_point(step, t, t_next, img, pred):
            if step + 1 == start:
                branch[start] = img.clone()

        plain = self.denoise(self.inp.img, self.timesteps, callback=keep_branch_point if start else None)
        return plain, branch.get(start)

    def fluxspace(self, editor: FluxSpaceEditor, start: int, branch: torch.Tensor, recorder=None) -> torch.Tensor:
        """The edited run: from the plain run's latent `branch` at step `start` to the end, with `editor`."""
        return self.denoise(branch, self.timesteps[start:], _FromStep(editor, start, self.settings.steps, recorder))

    def decode(self, *latents: torch.Tensor) -> list[Image.Image]:
        s, ppt = self.settings, self.models.pixels_per_token
        return decode(self.models, unpack(torch.cat(latents).float(), s.height, s.width, ppt))


def first_active_step(spec: EditSpec, timesteps: list[float]) -> int | None:
    """The first step at which the edit is on, or None if it never is."""
    return next((i for i, t in enumerate(timesteps[:-1]) if spec.is_active(i, t)), None)


class _FromStep:
    """The editor of a run that starts at step `offset` of the schedule, optionally recorded."""

    def __init__(self, editor: FluxSpaceEditor, offset: int, num_steps: int, recorder: Recorder | None):
        self.editor, self.offset, self.num_steps, self.recorder = editor, offset, num_steps, recorder

    def at_step(self, step: int, t: float, num_steps: int):
        edit = self.editor.at_step(step + self.offset, t, self.num_steps)
        if self.recorder is None:
            return edit
        return self.recorder if edit is None else _Recorded(edit, self.recorder)


class _Recorded:
    """An edit followed by a recorder on the same seam: the recorder keeps what the edit returned."""

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
) -> EditResult:
    """Generate `prompt` from `seed` twice, plain and with the FluxSpace edit `spec`.

    record=True also returns a Recorder with every block's attention output during the edited steps,
    and every double block's concept masks (`block_masks`).
    image: edit a real image instead (a path or PIL image): it is inverted (inversion: an
    inversion.InversionSettings) and `original` is its reconstruction, `edited` the reverse pass with
    the edit; the size comes from the image (fit: "resize" or "crop" to the token grid), `seed` is
    RF-Inversion's target noise, and true CFG is off unless settings.cfg_scale asks for it.
    Everything is validated before any sampling starts.
    """
    if image is not None:
        return _edit_real_image(models, prompt, spec, seed, settings, image, inversion, fit, record)
    s = models.sample_settings(settings)
    validate(spec, num_steps=s.steps, num_double_blocks=len(models.flow.double_blocks))
    encoded = encode_edit(spec, models.text)  # also checks that the mask words are in the edit prompts

    run = SamplingRun.prepare(models, prompt, seed, s, progress)
    start = first_active_step(spec, run.timesteps)
    plain, branch = run.plain_and_branch(start)
    editor = FluxSpaceEditor(spec, encoded, keep_masks=record)
    recorder = Recorder(keep=("img_attn_out", "attn")) if record else None
    if start is None:  # the edit never switches on: the edited image is the plain one
        edited = plain.clone()
    else:
        edited = run.fluxspace(editor, start, branch, recorder)

    original, edited_image = run.decode(plain, edited)
    ppt = models.pixels_per_token
    grid = (s.height // ppt, s.width // ppt)
    means = editor.masks.mean() if editor.masks.count else [torch.zeros(1, grid[0] * grid[1])] * len(spec.concepts)
    masks = [m[0].reshape(grid).cpu() for m in means]
    block_masks = editor.masks.entries if record else None
    return EditResult(original, edited_image, masks, spec, s, seed, prompt, recorder, block_masks)


def _edit_real_image(models, prompt, spec, seed, settings, image, inversion, fit, record) -> EditResult:
    from .inversion import InversionSettings, invert_image

    if record:
        raise ValueError("record=True is not available for real images yet")
    given = settings or SampleSettings()
    s = given.resolved(models.preset)
    cfg = given.cfg_scale if given.cfg_scale is not None else 1.0
    r = invert_image(models, image, prompt, steps=s.steps, settings=inversion or InversionSettings(), fit=fit,
                     seed=seed, cfg_scale=cfg, guidance=s.guidance, edit_spec=spec)  # fmt: skip
    w, h = r.image.size
    s = dataclasses.replace(s, width=w, height=h, cfg_scale=cfg)
    return EditResult(r.reconstruction, r.edited, r.masks, spec, s, seed, prompt)


def mask_overlay(image: Image.Image, mask: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The image tinted red where `mask` (h, w), values in [0, 1], upsampled to the image size, is on."""
    m = F.interpolate(mask[None, None].float(), size=(image.height, image.width), mode="nearest")[0, 0, ..., None]
    base = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # (H, W, 3)
    tint = torch.tensor(MASK_COLOUR, dtype=torch.float32)
    out = base * (1 - alpha * m) + tint * (alpha * m)
    return Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).numpy())
