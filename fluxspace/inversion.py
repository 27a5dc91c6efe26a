"""Real images: image latent -> noise (inversion) and noise -> image (reconstruction or edit).

Time convention as everywhere here (flux_core/sampling.py): t = 1 noise, t = 0 data, the model
predicts v = dx/dt = eps - x0. The solvers take any v(x, t, step) (flux_core.sampling.StepVelocity);
invert_image takes the model's from a SamplingRun (run.py), as every other entry point does. Inversion integrates dx/dt = v *upwards*, from t = 0 (the image's
latent) to t = 1 over the sampling schedule read backwards; sampling integrates it back down.

Solvers, each usable for both directions:

- "euler": x <- x + (t' - t) v(x, t). One evaluation a step. Exact on straight trajectories,
  biased on curved ones: plain Euler inversion reconstructs poorly (FireFlow: 16.6 dB on photos).
- "midpoint": RF-Solver's second order step, x_mid = x + (dt/2) v(x, t), x <- x + dt v(x_mid, t + dt/2).
  Two evaluations a step; with reuse=True the first is the previous step's midpoint velocity
  (FireFlow), so one evaluation a step after the first.

RF-Inversion (Rout et al. 2024) controls both ODEs with a straight-line target:

    forward (t up, towards noise y1 ~ N(0, I)):   u_hat = u + gamma * ((y1 - Y) / (1 - t) - u)
    reverse (t down, towards the image y0):       v_hat = v + eta * ((X - y0) / t - v)   on [start, stop)

(the reverse guide, written in this file's convention: it is the velocity of the straight line from
y0 through X, so eta = 1 lands on y0 exactly). gamma = eta = 0 is plain Euler, bit for bit.

Which time the model sees during RF-Inversion's forward pass: the diffusers community pipeline
steps on the shifted schedule but feeds the model a linear t_i = i / N. We feed the schedule's own
t (forward_time="schedule", the default): the model is asked about the point it is actually at,
and inversion and sampling see the same times. forward_time="linear" reproduces the pipeline.
"""

import re
import warnings
from dataclasses import dataclass, replace

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from flux_core.sampling import StepVelocity, get_noise, pack

from .images import pil_to_tensor, psnr
from .models import FluxModels
from .run import SamplingRun
from .settings import SampleSettings

SOLVERS = ("euler", "midpoint")
FORWARD_TIMES = ("schedule", "linear")


@dataclass(frozen=True)
class InversionSettings:
    """How to invert: solver, RF-Inversion's controls, and the time the forward pass feeds the model."""

    solver: str = "euler"  # euler | midpoint
    reuse: bool = False  # midpoint only: reuse the previous midpoint velocity (FireFlow)
    # RF-Inversion's controlled steps are Euler steps, as in the paper: gamma > 0 makes every forward
    # step one, eta > 0 the reverse steps in its window; the solver runs the others.
    gamma: float = 0.0  # RF-Inversion forward control strength in [0, 1]; 0: plain inversion
    eta: float = 0.0  # RF-Inversion reverse control strength in [0, 1]; 0: plain sampling
    eta_start: float = 0.0  # the reverse control is on for steps in [eta_start, eta_stop) x steps
    eta_stop: float = 0.25
    forward_time: str = "schedule"  # schedule | linear (see the module docstring)

    def validate(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; valid: {', '.join(SOLVERS)}")
        if self.reuse and self.solver != "midpoint":
            raise ValueError("reuse (FireFlow) needs solver='midpoint'")
        for name in ("gamma", "eta", "eta_start", "eta_stop"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
        if self.eta_start > self.eta_stop:
            raise ValueError(f"eta_start ({self.eta_start}) is after eta_stop ({self.eta_stop})")
        if self.forward_time not in FORWARD_TIMES:
            raise ValueError(f"unknown forward_time {self.forward_time!r}; valid: {', '.join(FORWARD_TIMES)}")


def _step(v: StepVelocity, x: Tensor, t: float, t_next: float, solver: str, carried: Tensor | None, feed_t: float, i: int):
    """One solver step from t to t_next; returns (x', the midpoint velocity to carry or None, evaluations)."""
    dt = t_next - t
    if solver == "euler":
        return x + dt * v(x, feed_t, i), None, 1
    first = carried if carried is not None else v(x, feed_t, i)
    v_mid = v(x + 0.5 * dt * first, feed_t + 0.5 * dt, i)
    return x + dt * v_mid, v_mid, 1 if carried is not None else 2


def invert(v: StepVelocity, x0: Tensor, timesteps: list[float], settings: InversionSettings = InversionSettings(),
           noise: Tensor | None = None) -> tuple[Tensor, int]:  # fmt: skip
    """The image latent x0 (B, N, C) at t = 0 -> its noise at t = 1. Returns (noise, model evaluations).

    timesteps: the sampling schedule (1 -> 0); inversion walks it backwards. noise: RF-Inversion's
    target y1 (required when gamma > 0).
    """
    settings.validate()
    if settings.gamma > 0 and noise is None:
        raise ValueError("RF-Inversion (gamma > 0) needs the target noise y1")
    up = list(reversed(timesteps))  # 0 -> 1
    n = len(up) - 1
    x, carried, evaluations = x0.float(), None, 0
    for i, (t, t_next) in enumerate(zip(up[:-1], up[1:], strict=True)):
        feed = i / n if settings.forward_time == "linear" else t
        if settings.gamma > 0:
            u = v(x, feed, i)
            evaluations += 1
            u_hat = u + settings.gamma * ((noise - x) / (1.0 - t) - u)
            x = x + (t_next - t) * u_hat
            continue
        x, carried, used = _step(v, x, t, t_next, settings.solver, carried if settings.reuse else None, feed, i)
        evaluations += used
    return x, evaluations


def reconstruct(v: StepVelocity, noise: Tensor, timesteps: list[float], settings: InversionSettings = InversionSettings(),
                y0: Tensor | None = None) -> tuple[Tensor, int]:  # fmt: skip
    """Noise (B, N, C) at t = 1 -> the latent at t = 0 over `timesteps`. Returns (latent, model evaluations).

    y0: the image latent RF-Inversion's reverse control steers to (required when eta > 0).
    """
    settings.validate()
    if settings.eta > 0 and y0 is None:
        raise ValueError("RF-Inversion (eta > 0) needs the image latent y0")
    n = len(timesteps) - 1
    on = range(round(settings.eta_start * n), round(settings.eta_stop * n))
    x, carried, evaluations = noise.float(), None, 0
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        if settings.eta > 0 and i in on:
            u = v(x, t, i)
            evaluations += 1
            v_hat = u + settings.eta * ((x - y0) / t - u)
            x = x + (t_next - t) * v_hat
            carried = None
            continue
        x, carried, used = _step(v, x, t, t_next, settings.solver, carried if settings.reuse else None, t, i)
        evaluations += used
    return x, evaluations


# ----------------------------------------------------------------------------------------------
# Real images with a loaded model: read, fit to the token grid, invert, reconstruct or edit

FITS = ("resize", "crop")


# The largest image read: its header is checked before any pixel is decoded (a 64 MP photo takes
# 192 MB as RGB; what it costs the model is checked later, at the size it is fitted to).
MAX_IMAGE_PIXELS = 64_000_000


# Inversion (and so editing a real image through it) is built on FLUX.1's sampler; on FLUX.2 an image
# enters as a reference the model conditions on, which needs no inversion.
NO_FLUX2_INVERSION = (
    "inverting a real image runs on FLUX.1 models only; FLUX.2 takes an image as a reference image "
    "(--image on generate, edit and sweep; image= in Python) instead"
)


def read_image(image) -> Image.Image:
    """A path or a PIL image -> an RGB PIL image; anything else, unreadable files, images of more than
    MAX_IMAGE_PIXELS (judged by the header, before decoding) and non-RGB modes that do not convert to
    RGB (e.g. 16-bit integer) are refused with the reason."""
    if not isinstance(image, Image.Image):
        path = image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound follows
                image = Image.open(path)
            _check_pixels(path, *image.size)
            image.load()
        except Image.DecompressionBombError as e:
            size = re.search(r"\((\d+) pixels\)", str(e))
            raise ValueError(f"image {path}: {size.group(1) if size else 'too many'} pixels in its header; "
                             f"at most {MAX_IMAGE_PIXELS:,} are read: downscale it first") from None  # fmt: skip
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
    else:
        _check_pixels("given", *image.size)
    if image.mode not in ("RGB", "RGBA", "L", "P", "LA", "CMYK"):
        raise ValueError(f"image mode {image.mode!r} is not an RGB-convertible image; give an 8-bit RGB or greyscale image")
    return image.convert("RGB")


def _check_pixels(name, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image {name} is {width}x{height} px ({width * height:,} pixels); at most "
                         f"{MAX_IMAGE_PIXELS:,} are read: downscale it first")  # fmt: skip


def fit_image(image: Image.Image, pixels_per_token: int, fit: str = "resize", size: int | None = None) -> Image.Image:
    """Make both sides multiples of pixels_per_token.

    fit="resize": scale (LANCZOS) so the longer side is `size` (default: unchanged), then round each
    side to the nearest multiple; the aspect ratio changes by less than one token.
    fit="crop": centre-crop each side down to a multiple (after the optional resize); nothing is
    stretched, a few border pixels are lost.
    """
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; valid: {', '.join(FITS)}")
    w, h = image.size
    if size is not None:
        scale = size / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        image = image.resize((w, h), Image.LANCZOS)
    step = pixels_per_token
    if fit == "crop":
        if w < step or h < step:
            raise ValueError(f"a {w}x{h} image cannot be cropped to a multiple of {step} px; use fit='resize' or a larger image")
        cw, ch = w // step * step, h // step * step
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch))
    tw, th = max(step, round(w / step) * step), max(step, round(h / step) * step)
    return image if (tw, th) == (w, h) else image.resize((tw, th), Image.LANCZOS)


def encode_latent(models: FluxModels, image: Image.Image) -> Tensor:
    """An RGB image whose sides are multiples of the token size -> its latent (1, Z, h, w), model dtype."""
    with torch.inference_mode():
        return models.ae.encode(pil_to_tensor(image).to(models.device, models.dtype))  # (1, Z, h, w)


def encode_image(models: FluxModels, image: Image.Image) -> Tensor:
    """An RGB image whose sides are multiples of the token size -> packed latent tokens (1, N, C), float32."""
    return pack(encode_latent(models, image).float())


@dataclass
class RealImageResult:
    """An image taken through inversion: the fitted input, its reconstruction, and the edit if asked."""

    image: Image.Image  # the input, fitted to the token grid: what PSNR is measured against
    reconstruction: Image.Image
    psnr: float  # reconstruction vs image, dB
    evaluations: int  # transformer evaluations of the inversion and the reconstruction
    noise: Tensor  # (1, N, C) the inverted latent at t = 1
    settings: SampleSettings  # resolved, with the fitted image's size
    edited: Image.Image | None = None
    masks: list | None = None  # per concept (h, w), as EditResult.masks


def invert_image(models: FluxModels, image, prompt: str = "", *, settings: SampleSettings | None = None,
                 inversion: InversionSettings = InversionSettings(), fit: str = "resize", size: int | None = None,
                 seed: int = 0, edit_spec=None, edit_prompt: str | None = None) -> RealImageResult:  # fmt: skip
    """Invert `image` (a path or PIL image) and reconstruct it; with edit_spec also sample the edit.

    prompt: the text the inversion and both reverse passes condition on (e.g. a caption of the image);
    edit_prompt: the edited pass's base prompt (default: prompt). settings: steps, guidance and true
    CFG as for generated images, except that CFG is off unless settings.cfg_scale is given (1: the
    most faithful reconstruction), and that the size comes from the image and parity does not apply.
    seed: RF-Inversion's target noise y1. Everything is checked before the model runs.
    """
    from .spec import encode_edit, validate
    from .step import FluxSpaceSchedule

    if models.family == "flux2":
        raise ValueError(NO_FLUX2_INVERSION)
    inversion.validate()
    s = models.sample_settings(replace(settings or SampleSettings(), width=None, height=None, parity=False),
                               real_image=True)  # fmt: skip
    fitted = fit_image(read_image(image), models.pixels_per_token, fit, size)
    w, h = fitted.size
    encoded = None
    if edit_spec is not None:
        validate(edit_spec, num_steps=s.steps, num_double_blocks=models.params.depth)
        encoded = encode_edit(edit_spec, models.text)

    run = SamplingRun.prepare(models, [prompt], [seed], replace(s, width=w, height=h), real_image=True)
    edit_text = run.text(edit_prompt) if edit_spec is not None and edit_prompt is not None else (None, None)
    x0 = encode_image(models, fitted)  # (1, N, C); every prompt is encoded before this
    y1 = None
    if inversion.gamma > 0:
        z, ppt = models.ae_params.z_channels, models.pixels_per_token
        y1 = pack(get_noise(1, h, w, seed, z, models.device, torch.float32, pixels_per_token=ppt))

    noise, n_inv = invert(run.velocity(), x0, run.timesteps, inversion, noise=y1)
    rec, n_rec = reconstruct(run.velocity(), noise, run.timesteps, inversion, y0=x0)
    (reconstruction,) = run.decode(rec)
    result = RealImageResult(fitted, reconstruction, psnr(fitted, reconstruction), n_inv + n_rec, noise, run.settings)
    if edit_spec is not None:
        schedule = FluxSpaceSchedule(edit_spec, encoded)
        txt, vec = edit_text
        edited, _ = reconstruct(run.velocity(schedule, txt=txt, vec=vec), noise, run.timesteps, inversion, y0=x0)
        (result.edited,) = run.decode(edited)
        result.masks = schedule.mean_masks(models.token_grid(w, h))
    return result
