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
from torch import Tensor, nn

from flux_core.sampling import StepVelocity

from .models import FluxModels
from .run import SamplingRun
from .settings import SampleSettings
from .spec import EditSpec, validate


class WithDirection(nn.Module):
    """The model with the output-level direction added: model(...) + lambda * (v_edit - v_prior).

    A model callable for flux_core.sampling.Velocity. The edit and prior predictions are computed in
    the same forward as the base rows (one batch of n + 2B rows; n = B, or 2B under true CFG, whose
    [positive; negative] rows share one x), and the direction is added to every base row, so after
    CFG v = v_cfg + lambda * direction.
    """

    def __init__(self, model: nn.Module, lambda_: float, edit_txt, edit_vec, prior_txt, prior_vec, batch: int = 1):
        super().__init__()
        self.model, self.lambda_, self.batch = model, lambda_, batch
        self.branch_txt = torch.cat([edit_txt.expand(batch, -1, -1), prior_txt.expand(batch, -1, -1)])  # (2B, T, C')
        self.branch_vec = torch.cat([edit_vec.expand(batch, -1), prior_vec.expand(batch, -1)])  # (2B, C'')

    @property
    def params(self):
        return self.model.params

    def forward(self, *, img, img_ids, txt, txt_ids, y, timesteps, guidance=None) -> Tensor:
        n, B = img.shape[0], self.batch
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
        return v + self.lambda_ * (v_edit - v_prior).repeat(n // B, 1, 1)  # (n, N, C)


class DirectionVelocity:
    """A velocity wrapper (flux_core.sampling.StepVelocity): the directed velocity on the steps where
    `spec` is on (step offset + i of the run), the plain one elsewhere."""

    def __init__(self, run: SamplingRun, spec: EditSpec, offset: int = 0):
        models = run.models
        edit_txt, edit_vec = models.text([spec.concepts[0].prompt])
        prior_txt, prior_vec = models.text([spec.prior_prompt])
        directed = WithDirection(models.flow, spec.concepts[0].lambda_fine, edit_txt, edit_vec, prior_txt, prior_vec,
                                 batch=run.inp.img.shape[0])  # fmt: skip
        self.spec, self.offset = spec, offset
        self.plain: StepVelocity = run.velocity()
        self.directed: StepVelocity = run.velocity(model=directed)

    def __call__(self, x: Tensor, t: float, step: int) -> Tensor:
        on = self.spec.is_active(step + self.offset, t)
        return (self.directed if on else self.plain)(x, t, step)


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
    validate(spec, num_steps=s.steps, num_double_blocks=models.params.depth)
    if len(spec.concepts) != 1 or spec.has_coarse or spec.blocks is not None or spec.concepts[0].tau_m != 0:
        raise ValueError(
            "direction_edit takes one concept with tau_m=0 and no coarse edit or block choice "
            "(the output-level direction has no mask, pooled vector or blocks)"
        )
    run = SamplingRun.prepare(models, [prompt], [seed], s, progress=progress)
    start = run.first_active_step(spec)
    # The edit and prior prompts are encoded before the transformer runs (runtime.py).
    directed = DirectionVelocity(run, spec, offset=start) if start is not None else None
    plain, branch = run.plain_and_branch(start)
    if start is None:
        return tuple(run.decode(plain, plain))
    edited = run.branch(start, branch, directed)
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
    run = SamplingRun.prepare(models, [prompt], [seed], settings, progress=progress)
    edited = run.prompt_velocity(edited_prompt, negative_prompt)  # encoded before the transformer runs
    plain, _ = run.plain_and_branch(None)
    return tuple(run.decode(plain, run.sample(run.inp.img, velocity=edited)))
