"""One prompt batch made ready to sample, and sampling with it: the one way every entry point runs.

    text encoders -> noise -> prepare -> schedule -> velocity -> Euler (or an inversion solver) -> decode

generate, edit_image, the inversion, the baselines and sweeps all build a `SamplingRun`: settings
resolved once (settings.py), noise from the official recipe (one generator per seed, so a sample
does not change with the batch around it), ids, schedule, text, the negative prompt of true CFG, and
the model's velocity. What differs between them is only what they integrate and with which edit.
"""

from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import Tensor

from flux_core import EditSchedule
from flux_core.sampling import (
    Condition,
    ModelInputs,
    StepCallback,
    StepVelocity,
    Velocity,
    euler,
    get_noise,
    get_schedule,
    prepare,
    scheduled,
    unpack,
)

from .images import tensor_to_pil
from .models import FluxModels
from .resources import check_fits, footprint
from .settings import SampleSettings


@dataclass(frozen=True)
class SamplingRun:
    """Prompts and seeds made ready to sample (one image per (prompt, seed) pair)."""

    models: FluxModels
    settings: SampleSettings  # resolved
    inp: ModelInputs  # noise (B, N, C) packed, ids, text, pooled vector (FLUX.2: flux2.sampling.ModelInputs)
    timesteps: list[float]
    negative: tuple[Tensor | None, Tensor | None]  # (neg_txt, neg_vec), or Nones without true CFG (FLUX.2: no vec)
    progress: bool = True
    # Kontext: the image being edited; FLUX.2: the reference images (flux2.sampling.References); as
    # tokens after the generated image's
    condition: Condition | None = None

    @classmethod
    def prepare(
        cls,
        models: FluxModels,
        prompts: list[str],
        seeds: list[int],
        settings: SampleSettings | None = None,
        *,
        progress: bool = True,
        real_image: bool = False,
        image=None,
    ) -> "SamplingRun":
        """Resolve the settings for this model, encode the prompts, draw the noise, build the schedule.

        image: a Kontext model's image to edit (a path or PIL image; fluxspace/kontext.py), fitted to
        the closest training resolution, which is also the size generated unless settings give one.
        On FLUX.2: reference images (one or a list; fluxspace/flux2.py), the first one's fitted size
        the size generated unless settings give one."""
        from . import flux2
        from .kontext import check_condition, encode_condition, fit_condition

        if len(prompts) != len(seeds):
            raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        is_flux2 = models.family == "flux2"
        if is_flux2:
            image = flux2.read_references(image) if image is not None else []
            first = image[0] if image else None
        else:
            check_condition(models, image)
            first = image = fit_condition(image, models.preset, models.pixels_per_token) if image is not None else None
        if first is not None:
            given = settings or SampleSettings()
            settings = replace(given, width=given.width or first.width, height=given.height or first.height)
        s = models.sample_settings(settings, real_image=real_image)
        need = footprint(0, models.params, models.ae_params, models.text_length, s.width, s.height,
                         models.pixels_per_token, len(seeds), s.cfg_scale != 1.0, 0, models.dtype)  # fmt: skip
        check_fits(need, models.device, f"{s.width}x{s.height} px, batch {len(seeds)}")  # the model is loaded
        # Every prompt of the run is encoded here, before the transformer runs (runtime.py).
        if is_flux2:
            inp, timesteps, negative = flux2.prepare(models, prompts, seeds, s)
            condition = flux2.encode_references(models, image, len(seeds)) if image else None
            return cls(models, s, inp, timesteps, negative, progress, condition)
        txt, vec = models.text(prompts)  # (B, T, C'), (B, C'')
        z, ppt = models.ae_params.z_channels, models.pixels_per_token
        noise = get_noise(len(seeds), s.height, s.width, seeds, z, models.device, torch.bfloat16, pixels_per_token=ppt)
        inp = prepare(noise if s.parity else noise.to(models.dtype), txt, vec)
        timesteps = get_schedule(s.steps, inp.img.shape[1], shift=models.preset.shift_schedule)
        negative = models.text([s.negative_prompt]) if s.cfg_scale != 1.0 else (None, None)
        condition = encode_condition(models, image, len(seeds)) if image is not None else None
        return cls(models, s, inp, timesteps, negative, progress, condition)

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype the latent is integrated in: float32, or the noise's own (bf16) in parity mode."""
        return self.inp.img.dtype if self.settings.parity else torch.float32

    def text(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        """Another prompt's (txt, vec), shaped and placed like this run's (FLUX.2: vec is None)."""
        return self.encode([prompt])

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """Prompts' (txt, vec) placed like this run's; FLUX.2 has no pooled vector (None)."""
        if self.models.family == "flux2":
            return self.models.text(prompts).to(self.inp.txt), None
        txt, vec = self.models.text(prompts)
        return txt.to(self.inp.txt), vec.to(self.inp.vec)

    def velocity(
        self,
        edit: EditSchedule | None = None,
        offset: int = 0,
        *,
        model=None,
        txt: Tensor | None = None,
        vec: Tensor | None = None,
        negative: tuple[Tensor, Tensor] | None = None,
    ) -> StepVelocity:
        """The model's (guided) velocity for this run, as v(x, t, step).

        edit: asked for the edit of step offset + step (a run that branches off at step `offset`);
        model, txt, vec, negative: another model callable, prompt or CFG negative than the run's.
        """
        s, inp, runtime = self.settings, self.inp, self.models.runtime
        neg_txt, neg_vec = self.negative if negative is None else negative
        flow = self.models.flow if model is None else model
        txt = inp.txt if txt is None else txt
        if self.models.family == "flux2":
            from . import flux2

            v = flux2.velocity(self.models, flow, inp, txt, s, neg_txt, self.condition)
        else:
            v = Velocity(
                flow, inp.img_ids, txt, inp.txt_ids, inp.vec if vec is None else vec, s.guidance, neg_txt=neg_txt,
                neg_vec=neg_vec, cfg_scale=s.cfg_scale, latent_dtype=self.latent_dtype, parity=s.parity,
                condition=self.condition,
            )  # fmt: skip
        step_velocity = scheduled(v, edit, s.steps, offset)

        def velocity(x: Tensor, t: float, step: int) -> Tensor:
            runtime.use("flow")  # the transformer on its device (a no-op while it is there)
            return step_velocity(x, t, step)

        return velocity

    def sample(
        self,
        x: Tensor,
        timesteps: list[float] | None = None,
        velocity: StepVelocity | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Euler from latent x (B, N, C) over `timesteps` (default: the whole schedule) with `velocity`
        (default: the plain model on the run's prompts). Returns the latent in latent_dtype."""
        x = x.to(self.inp.img.dtype).to(self.latent_dtype)
        timesteps = self.timesteps if timesteps is None else timesteps
        velocity = self.velocity() if velocity is None else velocity
        return euler(velocity, x, timesteps, callback=callback, progress=self.progress)

    def first_active_step(self, spec) -> int | None:
        """The first step of this run's schedule at which the edit `spec` is on, or None if it never is."""
        return next((i for i, t in enumerate(self.timesteps[:-1]) if spec.is_active(i, t)), None)

    def plain_and_branch(self, start: int | None) -> tuple[Tensor, Tensor | None]:
        """The plain run's final latent, and its latent where step `start` begins (None: no branch).

        An edited run is the plain run up to the step its edit switches on, so it starts from there.
        """
        branch = {0: self.inp.img}

        def keep_branch_point(step, t, t_next, img, pred):
            if step + 1 == start:
                branch[start] = img.clone()

        plain = self.sample(self.inp.img, callback=keep_branch_point if start else None)
        return plain, branch.get(start)

    def branch(self, start: int, latent: Tensor, velocity: StepVelocity) -> Tensor:
        """An edited run: from the plain run's `latent` at step `start` to the end, with `velocity`."""
        return self.sample(latent, self.timesteps[start:], velocity)

    def with_prompt(self, prompt: str, negative_prompt: str | None = None) -> Tensor:
        """The whole run again from the same noise with another prompt (and optionally another CFG negative)."""
        return self.sample(self.inp.img, velocity=self.prompt_velocity(prompt, negative_prompt))

    def prompt_velocity(self, prompt: str, negative_prompt: str | None = None) -> StepVelocity:
        """The velocity with another prompt (and optionally another CFG negative): the prompts are
        encoded now, so a caller can encode them before the transformer runs."""
        negative = None
        if negative_prompt is not None:
            if self.settings.cfg_scale == 1.0:
                raise ValueError("a negative prompt needs true CFG (cfg_scale != 1)")
            negative = self.encode([negative_prompt])
        txt, vec = self.text(prompt)
        return self.velocity(txt=txt, vec=vec, negative=negative)

    def unpack(self, latents: Tensor) -> Tensor:
        """Packed tokens (B, N, C) -> latents (B, C, h, w), float32."""
        s = self.settings
        if self.models.family == "flux2":
            from . import flux2

            return flux2.unpack(latents.float(), s)
        return unpack(latents.float(), s.height, s.width, self.models.pixels_per_token)

    def decode(self, *latents: Tensor) -> list[Image.Image]:
        """Packed latents of this run's size -> images, through the autoencoder."""
        return decode(self.models, self.unpack(torch.cat(latents)))


def decode(models: FluxModels, latents: Tensor) -> list[Image.Image]:
    """Latents (B, C, h, w) -> PIL images, one image at a time: batched convolutions round differently
    from batch to batch on the CPU, and an image should not depend on the batch it is decoded in."""
    with torch.inference_mode():
        ae = models.ae
        x = torch.cat([ae.decode(z[None].to(models.dtype)) for z in latents])  # (B, 3, H, W)
    return tensor_to_pil(x)


def sample_latents(
    models: FluxModels,
    prompts: list[str],
    seeds: list[int],
    settings: SampleSettings | None = None,
    *,
    progress: bool = True,
    callback: StepCallback | None = None,
    image=None,
) -> Tensor:
    """Denoise one image per (prompt, seed) pair. Returns unpacked latents (B, C, h, w), float32.
    image: the image a Kontext model edits by the prompts' instruction."""
    run = SamplingRun.prepare(models, prompts, seeds, settings, progress=progress, image=image)
    return run.unpack(run.sample(run.inp.img, callback=callback))


def generate(
    models: FluxModels,
    prompts: list[str],
    seeds: list[int],
    settings: SampleSettings | None = None,
    *,
    progress: bool = True,
    image=None,
) -> list[Image.Image]:
    """One image per (prompt, seed). Same seed, same image, whatever the batch around it.
    image: on a Kontext model, the image to edit (the prompts are instructions)."""
    return decode(models, sample_latents(models, prompts, seeds, settings, progress=progress, image=image))
