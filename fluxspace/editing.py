"""Prompt + edit -> the unedited and the edited image from the same noise, and the masks.

    models = load_models("path/to/model")
    result = edit_image(models, "a portrait of a man", EditSpec(concepts=(Concept("eyeglasses"),)), seed=0)
    result.original, result.edited, result.masks

The steps before the edit switches on are the same in both runs, so the edited run starts from the
plain run's latent at that step instead of computing them again.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flux_core.recorder import Recorder
from flux_core.sampling import denoise, get_noise, get_schedule, prepare, unpack

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
) -> EditResult:
    """Generate `prompt` from `seed` twice, plain and with the FluxSpace edit `spec`.

    record=True also returns a Recorder with every block's attention output during the edited steps,
    and every double block's concept masks (`block_masks`).
    Everything is validated before any sampling starts.
    """
    s = (settings or SampleSettings()).resolved(models.preset)
    s.validate(models.pixels_per_token)
    validate(spec, num_steps=s.steps, num_double_blocks=len(models.flow.double_blocks))
    encoded = encode_edit(spec, models.text)  # also checks that the mask words are in the edit prompts

    txt, vec = models.text([prompt])  # (1, T, C'), (1, C'')
    z = models.ae.params.z_channels
    ppt = models.pixels_per_token
    noise = get_noise(1, s.height, s.width, seed=[seed], z_channels=z, device=models.device, pixels_per_token=ppt)
    inp = prepare(noise if s.parity else noise.to(models.dtype), txt, vec)
    timesteps = get_schedule(s.steps, inp.img.shape[1], shift=models.preset.shift_schedule)
    neg_txt, neg_vec = models.text([s.negative_prompt]) if s.cfg_scale != 1.0 else (None, None)

    def run(x, ts, edit=None, callback=None):
        return denoise(
            models.flow, x, inp.img_ids, inp.txt, inp.txt_ids, inp.vec, ts, guidance=s.guidance,
            neg_txt=neg_txt, neg_vec=neg_vec, cfg_scale=s.cfg_scale, progress=progress, parity=s.parity,
            edit=edit, callback=callback,
        )  # fmt: skip

    start = first_active_step(spec, timesteps)
    branch = {0: inp.img}

    def keep_branch_point(step, t, t_next, img, pred):
        if step + 1 == start:
            branch[start] = img.clone()

    plain = run(inp.img, timesteps, callback=keep_branch_point if start else None)
    editor = FluxSpaceEditor(spec, encoded, keep_masks=record)
    recorder = Recorder(keep=("img_attn_out", "attn")) if record else None
    if start is None:  # the edit never switches on: the edited image is the plain one
        edited = plain.clone()
    else:
        x = branch[start].to(inp.img.dtype)
        edited = run(x, timesteps[start:], _FromStep(editor, start, s.steps, recorder))

    original, edited_image = decode(models, unpack(torch.cat([plain, edited]).float(), s.height, s.width, ppt))
    grid = (s.height // ppt, s.width // ppt)
    means = editor.masks.mean() if editor.masks.count else [torch.zeros(1, grid[0] * grid[1])] * len(spec.concepts)
    masks = [m[0].reshape(grid).cpu() for m in means]
    block_masks = editor.masks.entries if record else None
    return EditResult(original, edited_image, masks, spec, s, seed, prompt, recorder, block_masks)


def mask_overlay(image: Image.Image, mask: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The image tinted red where `mask` (h, w), values in [0, 1], upsampled to the image size, is on."""
    m = F.interpolate(mask[None, None].float(), size=(image.height, image.width), mode="nearest")[0, 0, ..., None]
    base = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # (H, W, 3)
    tint = torch.tensor(MASK_COLOUR, dtype=torch.float32)
    out = base * (1 - alpha * m) + tint * (alpha * m)
    return Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).numpy())
