"""Baselines FluxSpace is measured against (issue 5): a prompt change, and an output-level edit direction.

Both return the unedited and the edited image from the same noise, like edit_image, so every method
of the edit-quality benchmark is compared on the same base images.

- prompt_edit: regenerate with another prompt (e.g. the base prompt plus ", eyeglasses"). The whole
  trajectory changes, so identity drifts: the paper's motivation.
- direction_edit: noise-prediction editing as LEDITS-style methods do it, in the velocity space of a
  rectified flow: at every edited step

      v = v(x, base) + lambda * (v(x, edit) - v(x, prior))

  with v(x, base) guided as usual (true CFG where the model needs it) and the two extra
  predictions conditional. It edits the model's output where FluxSpace edits the attention inside
  the joint blocks; same edit prompt, prior, lambda and timing, no mask and no projection.
"""

import torch
from PIL import Image
from torch import nn

from .edit import EditSpec, validate
from .editing import SamplingRun, first_active_step
from .pipeline import FluxModels, SampleSettings


class OutputDirection(nn.Module):
    """The model wrapper of direction_edit, and its own edit schedule.

    As `edit` of denoise, at_step returns self while the spec is on; denoise hands that back to the
    model call, which is this object: it then adds lambda * (v_edit - v_prior), computed in the same
    forward as the base prediction (one batch of n + 2B rows). On other steps it is the plain model.
    """

    def __init__(self, model, spec: EditSpec, edit_txt, edit_vec, prior_txt, prior_vec, batch: int, offset: int = 0):
        super().__init__()
        self.model, self.spec, self.batch, self.offset = model, spec, batch, offset
        self.lambda_ = spec.concepts[0].lambda_fine
        self.branch_txt = torch.cat([edit_txt.expand(batch, -1, -1), prior_txt.expand(batch, -1, -1)])  # (2B, T, C')
        self.branch_vec = torch.cat([edit_vec.expand(batch, -1), prior_vec.expand(batch, -1)])  # (2B, C'')

    @classmethod
    def for_spec(cls, models: FluxModels, spec: EditSpec, batch: int = 1, offset: int = 0) -> "OutputDirection":
        """Encode spec's concept and prior prompts with the models' text encoders and wrap models.flow."""
        edit_txt, edit_vec = models.text([spec.concepts[0].prompt])
        prior_txt, prior_vec = models.text([spec.prior_prompt])
        return cls(models.flow, spec, edit_txt, edit_vec, prior_txt, prior_vec, batch=batch, offset=offset)

    @property
    def params(self):
        return self.model.params

    def at_step(self, step: int, t: float, num_steps: int):
        return self if self.spec.is_active(step + self.offset, t) else None

    def forward(self, *, img, img_ids, txt, txt_ids, y, timesteps, guidance=None, edit=None):
        if edit is None:
            return self.model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=y, timesteps=timesteps,
                              guidance=guidance)  # fmt: skip
        n, B = img.shape[0], self.batch  # n = B, or 2B with true CFG ([positive; negative], same x)
        x = img[:B]  # (B, N, C)

        def both(a, b):
            return torch.cat([a, b.to(a)])

        out = self.model(
            img=torch.cat([img, x, x]), img_ids=torch.cat([img_ids, img_ids[:B], img_ids[:B]]),
            txt=both(txt, self.branch_txt), txt_ids=torch.cat([txt_ids, txt_ids[:B], txt_ids[:B]]),
            y=both(y, self.branch_vec), timesteps=torch.cat([timesteps, timesteps[:B], timesteps[:B]]),
            guidance=None if guidance is None else torch.cat([guidance, guidance[:B], guidance[:B]]),
        )  # fmt: skip  (n + 2B, N, C)
        v, v_edit, v_prior = out[:n], out[n : n + B], out[n + B :]
        # Added to the positive and the negative rows alike, so after CFG v = v_cfg + lambda * direction.
        return v + self.lambda_ * (v_edit - v_prior).repeat(n // B, 1, 1)  # (n, N, C)


def direction_edit(
    models: FluxModels,
    prompt: str,
    spec: EditSpec,
    seed: int = 0,
    settings: SampleSettings | None = None,
    *,
    progress: bool = False,
) -> tuple[Image.Image, Image.Image]:
    """(unedited, edited) with the output-level direction of spec's single concept.

    Uses spec.concepts[0].prompt and lambda_fine, spec.prior_prompt, start and end; masks, the
    coarse edit and the block choice do not exist at the output level and must be left unset.
    """
    s = models.sample_settings(settings)
    validate(spec, num_steps=s.steps, num_double_blocks=len(models.flow.double_blocks))
    if len(spec.concepts) != 1 or spec.has_coarse or spec.blocks is not None or spec.concepts[0].tau_m != 0:
        raise ValueError(
            "direction_edit takes one concept with tau_m=0 and no coarse edit or block choice "
            "(the output-level direction has no mask, pooled vector or blocks)"
        )
    run = SamplingRun.prepare(models, prompt, seed, s, progress)
    start = first_active_step(spec, run.timesteps)
    plain, branch = run.plain_and_branch(start)
    if start is None:
        return tuple(run.decode(plain, plain))
    model = OutputDirection.for_spec(models, spec, offset=start)
    edited = run.denoise(branch, run.timesteps[start:], edit=model, model=model)
    return tuple(run.decode(plain, edited))


def prompt_edit(
    models: FluxModels,
    prompt: str,
    edited_prompt: str,
    seed: int = 0,
    settings: SampleSettings | None = None,
    *,
    negative_prompt: str | None = None,
    progress: bool = False,
) -> tuple[Image.Image, Image.Image]:
    """(unedited, edited): `prompt` and `edited_prompt` from the same noise, every step.

    negative_prompt: the edited run's CFG negative (e.g. the attribute to remove); default the settings'.
    """
    s = models.sample_settings(settings)
    run = SamplingRun.prepare(models, prompt, seed, s, progress)
    plain, _ = run.plain_and_branch(None)
    return tuple(run.decode(plain, run.with_prompt(edited_prompt, negative_prompt)))
