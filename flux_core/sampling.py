"""Sampling math for Flux: noise, packing and position ids, the time schedule, the Euler loop.

Mirrors `flux/sampling.py` of the official BFL release. Prompts -> images lives elsewhere; this
file holds only the math a pipeline strings together:

    get_noise -> prepare -> get_schedule -> denoise -> unpack -> (autoencoder decode)

Time convention (rectified flow, used everywhere in this codebase):
    t = 1 is pure noise, t = 0 is data;  x_t = (1 - t) x0 + t eps;
    the network predicts the velocity v = eps - x0;  Euler: x <- x + (t_next - t) v.

Letters: B batch, C latent channels, H/W rows/columns of 2x2 latent patches (= pixels / 16 for
FLUX.1's autoencoder; `pixels_per_token` = 2 x the autoencoder's downsampling in general),
N = H*W image tokens, T text tokens. `height`/`width` are always in pixels.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from einops import rearrange, repeat
from torch import Tensor, nn
from tqdm.auto import tqdm

from .seam import Edit, EditSchedule

# One image token covers 16x16 pixels: the autoencoder downsamples by 8, pack() joins 2x2 latents.
# Functions that convert pixels to latents take `pixels_per_token` for autoencoders of other depths
# (flux-mini's downsamples by 4: 8 px a token); the default is FLUX.1's.
PIXELS_PER_TOKEN = 16
# Schedule shift endpoints (official `get_lin_function` defaults): mu = 0.5 at 256 image tokens
# (256x256 px) and mu = 1.15 at 4096 tokens (1024x1024 px).
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


# ----------------------------------------------------------------------------- sizes and noise


def check_image_size(height: int, width: int, pixels_per_token: int = PIXELS_PER_TOKEN) -> None:
    """Raise ValueError unless both sides are positive multiples of pixels_per_token, naming the nearest valid ones."""
    step = pixels_per_token
    for name, value in (("height", height), ("width", width)):
        if value > 0 and value % step == 0:
            continue
        lower = value // step * step
        valid = [s for s in (lower, lower + step) if s >= step] or [step]
        positive = "positive " if value <= 0 else ""
        raise ValueError(
            f"{name} {value} is not a {positive}multiple of {step}; nearest valid: {' or '.join(map(str, valid))}"
        )


def latent_size(height: int, width: int, pixels_per_token: int = PIXELS_PER_TOKEN) -> tuple[int, int]:
    """Latent (rows, cols) for an image in pixels: 2 * ceil(px / 16) for FLUX.1, as the official code rounds up."""
    return 2 * math.ceil(height / pixels_per_token), 2 * math.ceil(width / pixels_per_token)


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    seed: int | Sequence[int],
    z_channels: int = 16,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    pixels_per_token: int = PIXELS_PER_TOKEN,
) -> Tensor:
    """Gaussian latent noise, (B, z_channels, 2*ceil(H/16), 2*ceil(W/16)) (16: pixels_per_token).

    Drawn on the CPU from a torch.Generator in `dtype` (the official code draws in bf16), then moved
    to `device`: the same seed gives the same noise, hence the same image, on any device.
    - int seed: one generator for the whole batch, as the official code does; sample i then depends
      on the batch size and its position.
    - list of seeds (one per sample): each sample drawn with its own generator, so a sample does not
      change with the batch it is drawn in.
    """
    if num_samples < 1 or height < 1 or width < 1:
        raise ValueError(f"num_samples, height and width must be >= 1; got {num_samples}, {height}, {width}")
    shape = (z_channels, *latent_size(height, width, pixels_per_token))
    noise = seeded_randn(num_samples, shape, seed, dtype)  # (B, C, 2H, 2W)
    return noise.to(device)


def seeded_randn(num_samples: int, shape: tuple[int, ...], seed: int | Sequence[int], dtype: torch.dtype) -> Tensor:
    """(num_samples, *shape) standard normal on the CPU: one generator for an int seed, one per sample
    for a list of seeds (see get_noise). FLUX.2's noise (flux_core/flux2/sampling.py) draws the same way."""
    if isinstance(seed, Integral):
        g = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn(num_samples, *shape, generator=g, dtype=dtype)
    seeds = list(seed)
    if len(seeds) != num_samples:
        raise ValueError(f"got {len(seeds)} seeds for num_samples={num_samples}; pass one seed per sample")
    return torch.cat(
        [torch.randn(1, *shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=dtype) for s in seeds]
    )


# ----------------------------------------------------------------------------- packing and ids


def pack(x: Tensor) -> Tensor:
    """Latents to tokens: each 2x2 latent patch becomes one token of C*4 channels. (B, C, 2H, 2W) -> (B, N, C*4)."""
    if x.ndim != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"pack expects latents (B, C, h, w) with even h and w; got shape {tuple(x.shape)}")
    return rearrange(x, "B C (H ph) (W pw) -> B (H W) (C ph pw)", ph=2, pw=2)


def unpack(x: Tensor, height: int, width: int, pixels_per_token: int = PIXELS_PER_TOKEN) -> Tensor:
    """Inverse of pack, for an image of height x width pixels. (B, N, C*4) -> (B, C, 2H, 2W)."""
    rows, cols = (s // 2 for s in latent_size(height, width, pixels_per_token))
    if x.ndim != 3 or x.shape[1] != rows * cols:
        raise ValueError(
            f"unpack of a {height}x{width} px image expects (B, {rows * cols}, C*4) tokens; got {tuple(x.shape)}"
        )
    return rearrange(x, "B (H W) (C ph pw) -> B C (H ph) (W pw)", H=rows, W=cols, ph=2, pw=2)


def img_ids(
    batch: int, height: int, width: int, device: torch.device | str = "cpu", pixels_per_token: int = PIXELS_PER_TOKEN,
    index: int = 0,
) -> Tensor:
    """Position ids of the image tokens in pack() order: (index, row, col) per token. Returns (B, N, 3) float32.

    RoPE axis 0 tells images apart: 0 for the image being generated, 1 for a Kontext conditioning
    image (official sampling.prepare_kontext: "the same as base image with the first dimension set
    to 1"); axes 1, 2 are the grid.
    """
    rows, cols = (s // 2 for s in latent_size(height, width, pixels_per_token))
    grid = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # 2 x (H, W)
    ids = torch.stack([torch.full_like(grid[0], index), *grid], dim=-1).to(device, torch.float32)  # (H, W, 3)
    return repeat(ids, "H W three -> B (H W) three", B=batch)  # (B, N, 3)


def txt_ids(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    """Text tokens all sit at position (0, 0, 0): T5 already encodes their order. Returns (B, T, 3) float32."""
    return torch.zeros(batch, length, 3, device=device, dtype=torch.float32)


@dataclass(frozen=True)
class ModelInputs:
    """What the transformer takes besides the time: packed latents, text, pooled vector and their ids."""

    img: Tensor  # (B, N, C*4)
    img_ids: Tensor  # (B, N, 3)
    txt: Tensor  # (B, T, context_in_dim)
    txt_ids: Tensor  # (B, T, 3)
    vec: Tensor  # (B, vec_in_dim)


def prepare(img: Tensor, txt: Tensor, vec: Tensor) -> ModelInputs:
    """Pack latents (B, C, h, w) and build ids; a batch-1 img, txt or vec is repeated to the batch size.

    Same as the official `prepare`, minus the text encoders: pass their outputs, txt (B, T, C') and
    vec (B, C''). Everything lands on img's device.
    """
    if img.ndim != 4 or txt.ndim != 3 or vec.ndim != 2:
        raise ValueError(
            "prepare expects img (B, C, h, w), txt (B, T, C') and vec (B, C''); "
            f"got {tuple(img.shape)}, {tuple(txt.shape)}, {tuple(vec.shape)}"
        )
    sizes = {"img": img.shape[0], "txt": txt.shape[0], "vec": vec.shape[0]}
    bs = max(sizes.values())
    if any(n not in (1, bs) for n in sizes.values()):
        raise ValueError(f"batch sizes must be equal or 1 (then repeated); got {sizes}")

    def to_batch(x: Tensor) -> Tensor:
        return repeat(x, "1 ... -> B ...", B=bs) if x.shape[0] == 1 and bs > 1 else x

    packed = to_batch(pack(img))  # (B, N, C*4)
    h, w = img.shape[-2:]
    return ModelInputs(
        img=packed,
        img_ids=img_ids(bs, h, w, device=img.device, pixels_per_token=2),  # (B, N, 3); in latent pixels
        txt=to_batch(txt).to(img.device),  # (B, T, C')
        txt_ids=txt_ids(bs, txt.shape[1], device=img.device),  # (B, T, 3)
        vec=to_batch(vec).to(img.device),  # (B, C'')
    )


# ----------------------------------------------------------------------------- Kontext conditioning


@dataclass(frozen=True)
class Condition:
    """A Kontext conditioning image as tokens: appended after the generated image's tokens in the
    sequence, its ids the usual grid with axis 0 set to 1 (official sampling.prepare_kontext)."""

    img: Tensor  # (B, M, C*4) packed latents of the encoded image
    ids: Tensor  # (B, M, 3)


def prepare_condition(latent: Tensor, batch: int | None = None) -> Condition:
    """An encoded conditioning image (B or 1, C, h, w) as tokens, repeated to `batch` if given."""
    if latent.ndim != 4:
        raise ValueError(f"a conditioning latent is (B, C, h, w); got shape {tuple(latent.shape)}")
    bs = batch or latent.shape[0]
    if latent.shape[0] not in (1, bs):
        raise ValueError(f"conditioning latent batch {latent.shape[0]} for a batch of {bs}: give 1 or {bs}")
    img = pack(latent)  # (b, M, C*4)
    img = repeat(img, "1 M C -> B M C", B=bs) if img.shape[0] == 1 else img  # (B, M, C*4)
    h, w = latent.shape[-2:]
    return Condition(img, img_ids(bs, h, w, device=latent.device, pixels_per_token=2, index=1))  # (B, M, 3)


def preferred_size(width: int, height: int, resolutions: Sequence[tuple[int, int]],
                   pixels_per_token: int = PIXELS_PER_TOKEN) -> tuple[int, int]:  # fmt: skip
    """The (width, height) of `resolutions` closest in aspect ratio to width x height (ties: the
    narrower), floored to whole tokens, as the official prepare_kontext fits its conditioning image."""
    if not resolutions:
        raise ValueError("no preferred resolutions to choose from")
    aspect = width / height
    _, w, h = min((abs(aspect - rw / rh), rw, rh) for rw, rh in resolutions)
    return pixels_per_token * (w // pixels_per_token), pixels_per_token * (h // pixels_per_token)


# ----------------------------------------------------------------------------- schedule


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """Shift t towards noise: e^mu / (e^mu + (1/t - 1)^sigma). Fixes t = 0 and t = 1 (t = 0 needs a Tensor)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(
    x1: float = BASE_SEQ_LEN, y1: float = BASE_SHIFT, x2: float = MAX_SEQ_LEN, y2: float = MAX_SHIFT
) -> Callable[[float], float]:
    """The line through (x1, y1) and (x2, y2): maps image tokens to mu, extrapolated (no clamp) beyond."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
    shift: bool = True,
) -> list[float]:
    """num_steps + 1 times from 1 to 0. dev: shifted by resolution; schnell: shift=False, plain linspace.

    More tokens carry more redundant signal, so larger images spend more steps at high noise
    (SD3 paper, section 5.3.2; FLUX uses a linear fit of mu in the token count).
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1; got {num_steps!r}")
    timesteps = torch.linspace(1, 0, num_steps + 1)  # float32, as the official code
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


# ----------------------------------------------------------------------------- the Euler loop

# callback(step, t, t_next, img, pred), called after each step: step counts from 0, img is the
# latent after the step (B, N, C*4), pred the (guided) velocity used for it. Tensors are inference
# tensors: clone them to keep them past the loop.
StepCallback = Callable[[int, float, float, Tensor, Tensor], None]


def _model_dtype(model: Callable, fallback: torch.dtype) -> torch.dtype:
    """dtype of the first floating parameter (or buffer) of an nn.Module; `fallback` if it has none."""
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                return t.dtype
    return fallback


def _wants_guidance(model: Callable, guidance: float | None) -> bool:
    """dev models embed the distilled guidance scale; schnell has no guidance_in and ignores it."""
    params = getattr(model, "params", None)
    if params is None:
        return guidance is not None
    if params.guidance_embed and guidance is None:
        raise ValueError("this model is guidance-distilled (dev): pass guidance, e.g. guidance=3.5")
    return bool(params.guidance_embed)


class Velocity:
    """The model as the ODE's right-hand side: v(x, t) for a batch of latents, conditioning fixed.

    Holds what every step shares (ids, text, pooled vector, guidance, the negative prompt for true
    CFG) and applies the dtype rules of denoise. denoise is an Euler loop over it (`scheduled` then
    `euler`); the inversion solvers (fluxspace/inversion.py) call it at any x and t.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        img_ids: Tensor,  # (B, N, 3)
        txt: Tensor,  # (B, T, C')
        txt_ids: Tensor,  # (B, T, 3)
        vec: Tensor,  # (B, C'')
        guidance: float | None = None,
        *,
        neg_txt: Tensor | None = None,  # (B or 1, T, C')
        neg_vec: Tensor | None = None,  # (B or 1, C'')
        cfg_scale: float = 1.0,
        latent_dtype: torch.dtype = torch.float32,  # parity mode: the caller's latent dtype (bf16)
        parity: bool = False,
        condition: Condition | None = None,  # Kontext: the conditioning image's tokens
    ):
        bs = img_ids.shape[0]
        self.n_img = img_ids.shape[1]  # the generated tokens: the velocity is theirs only
        self.cond = None
        if condition is not None:
            if condition.img.shape[0] != bs or condition.ids.shape[:2] != condition.img.shape[:2]:
                raise ValueError(f"the condition's tokens {tuple(condition.img.shape)} and ids {tuple(condition.ids.shape)} "
                                 f"must have the batch size {bs} and one id per token")  # fmt: skip
            img_ids = torch.cat([img_ids, condition.ids.to(img_ids)], dim=1)  # (B, N+M, 3)
            self.cond = condition.img
        self.use_cfg = cfg_scale != 1.0
        if self.use_cfg:
            if neg_txt is None or neg_vec is None:
                raise ValueError(
                    f"cfg_scale={cfg_scale} needs neg_txt and neg_vec (the negative prompt's embeddings)"
                )
            if neg_txt.shape[1] != txt.shape[1]:
                raise ValueError(
                    f"neg_txt has {neg_txt.shape[1]} tokens but txt has {txt.shape[1]}: true CFG runs both prompts "
                    "in one batch, so they need the same length (pad both to the same T5 max_length)"
                )
            if neg_txt.shape[0] not in (1, bs) or neg_vec.shape[0] not in (1, bs):
                raise ValueError(
                    f"neg_txt and neg_vec need batch 1 or {bs}; got {tuple(neg_txt.shape)} and {tuple(neg_vec.shape)}"
                )
            # One forward of batch 2B: [positive ; negative].
            img_ids = torch.cat([img_ids, img_ids])  # (2B, N, 3)
            txt = torch.cat([txt, neg_txt.expand(bs, -1, -1).to(txt)])  # (2B, T, C')
            txt_ids = torch.cat([txt_ids, txt_ids])  # (2B, T, 3)
            vec = torch.cat([vec, neg_vec.expand(bs, -1).to(vec)])  # (2B, C'')
        self.model, self.cfg_scale, self.n_model = model, cfg_scale, img_ids.shape[0]
        self.model_dtype = _model_dtype(model, fallback=latent_dtype if parity else torch.float32)
        self.t_dtype = latent_dtype if parity else self.model_dtype  # official: torch.full(..., dtype=img.dtype)
        self.latent_dtype = latent_dtype
        self.guidance_vec = None
        if _wants_guidance(model, guidance):
            g = torch.full((self.n_model,), guidance, dtype=self.t_dtype, device=img_ids.device)
            self.guidance_vec = g.to(self.model_dtype)
        self.img_ids, self.txt_ids = img_ids, txt_ids
        self.txt, self.vec = txt.to(self.model_dtype), vec.to(self.model_dtype)
        if self.cond is not None:  # in the latent dtype first, as the official loop concatenates it
            cond = self.cond.to(latent_dtype).to(self.model_dtype)  # (B, M, C)
            self.cond = torch.cat([cond, cond]) if self.use_cfg else cond

    def __call__(self, img: Tensor, t: float, edit: Edit | None = None) -> Tensor:
        """The (guided) velocity at latent img (B, N, C) and time t, in img's dtype. edit: this step's edit or None."""
        t_vec = torch.full((self.n_model,), t, dtype=self.t_dtype, device=img.device).to(self.model_dtype)
        x = img.to(self.model_dtype)  # (B, N, C)
        x = torch.cat([x, x]) if self.use_cfg else x  # (B or 2B, N, C)
        if self.cond is not None:
            x = torch.cat([x, self.cond], dim=1)  # (B or 2B, N+M, C): Kontext's conditioning tokens after
        extra = {"edit": edit} if edit is not None else {}
        pred = self.model(
            img=x,
            img_ids=self.img_ids,
            txt=self.txt,
            txt_ids=self.txt_ids,
            y=self.vec,
            timesteps=t_vec,
            guidance=self.guidance_vec,
            **extra,
        )[:, : self.n_img].to(img.dtype)  # (B or 2B, N, C): the conditioning tokens' prediction is dropped
        if self.use_cfg:
            v_pos, v_neg = pred.chunk(2)  # (B, N, C) each
            pred = v_neg + self.cfg_scale * (v_pos - v_neg)  # (B, N, C)
        return pred


# v(x, t, step): the velocity at latent x (B, N, C) and time t, for solver step `step` (counted from
# 0 in sampling order, so that an edit can switch on by step). Euler here and the inversion solvers
# (fluxspace/inversion.py) integrate any such function.
StepVelocity = Callable[[Tensor, float, int], Tensor]


def euler(
    velocity: StepVelocity,
    img: Tensor,  # (B, N, C) the latent at timesteps[0]
    timesteps: Sequence[float],
    *,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> Tensor:
    """Integrate dx/dt = v from timesteps[0] to timesteps[-1] with Euler steps, in img's dtype."""
    if len(timesteps) < 2:
        raise ValueError(f"timesteps needs at least 2 values (start and end); got {len(timesteps)}")
    steps = list(zip(timesteps[:-1], timesteps[1:], strict=True))
    with torch.inference_mode():
        for step, (t_curr, t_next) in enumerate(tqdm(steps, desc="denoise", disable=not progress)):
            pred = velocity(img, t_curr, step)  # (B, N, C)
            # Python-float step times a latent-dtype tensor, as in the official loop.
            img = img + (t_next - t_curr) * pred  # (B, N, C)
            if callback is not None:
                callback(step, float(t_curr), float(t_next), img, pred)
    return img


def scheduled(v: Velocity, edit: EditSchedule | None, num_steps: int, offset: int = 0) -> StepVelocity:
    """v as a StepVelocity whose step `i` asks `edit` for the edit of step offset + i of num_steps."""

    def velocity(img: Tensor, t: float, step: int) -> Tensor:
        step_edit = edit.at_step(step + offset, float(t), num_steps) if edit is not None else None
        with torch.inference_mode():
            return v(img, t, step_edit)

    return velocity


def denoise(
    model: Callable[..., Tensor],
    img: Tensor,  # (B, N, C*4) packed noise
    img_ids: Tensor,  # (B, N, 3)
    txt: Tensor,  # (B, T, C')
    txt_ids: Tensor,  # (B, T, 3)
    vec: Tensor,  # (B, C'')
    timesteps: Sequence[float],
    guidance: float | None = None,
    *,
    neg_txt: Tensor | None = None,  # (B or 1, T, C') negative prompt, true CFG only
    neg_vec: Tensor | None = None,  # (B or 1, C'')
    cfg_scale: float = 1.0,
    callback: StepCallback | None = None,
    progress: bool = True,
    parity: bool = False,
    edit: EditSchedule | None = None,
    condition: Condition | None = None,
) -> Tensor:
    """Integrate dx/dt = v from timesteps[0] to timesteps[-1] with Euler steps. Returns (B, N, C*4).

    guidance: the distilled guidance scale of dev models (a per-sample embedding input, one forward
    per step); ignored by models without guidance_in (schnell).
    True classifier-free guidance: with neg_txt, neg_vec and cfg_scale != 1, the positive and
    negative prompts run as one forward of batch 2B and v = v_neg + cfg_scale * (v_pos - v_neg).
    Precision: by default the latent is kept and updated in float32 and cast to the model dtype only
    for the model call (t and guidance go in as the model dtype too: the time embedding takes t's
    dtype); the result is float32. parity=True reproduces the official rounding: t and
    guidance built in the latent dtype and the update done in the latent's own dtype (bf16 noise
    from get_noise gives the official bf16 loop); the result keeps that dtype.
    edit: an EditSchedule (flux_core.seam): asked for each step's edit, None for a plain step;
    FluxSpace and the recorder provide one.
    condition: Kontext's conditioning image (prepare_condition): its tokens ride along after the
    image's at every step and their prediction is dropped (official denoise's img_cond_seq).
    """
    if len(timesteps) < 2:
        raise ValueError(f"timesteps needs at least 2 values (start and end); got {len(timesteps)}")
    bs = img.shape[0]
    if img.ndim != 3 or any(x.shape[0] != bs for x in (img_ids, txt, txt_ids, vec)):
        raise ValueError(
            "denoise expects img (B, N, C), img_ids (B, N, 3), txt (B, T, C'), txt_ids (B, T, 3), vec (B, C'') "
            "with one batch size (prepare() builds them); got "
            + ", ".join(str(tuple(x.shape)) for x in (img, img_ids, txt, txt_ids, vec))
        )
    # The latent the update runs in: float32 by default, the caller's dtype in parity mode.
    img = img if parity else img.float()
    v = Velocity(model, img_ids, txt, txt_ids, vec, guidance, neg_txt=neg_txt, neg_vec=neg_vec,
                 cfg_scale=cfg_scale, latent_dtype=img.dtype, parity=parity, condition=condition)  # fmt: skip
    num_steps = len(timesteps) - 1
    return euler(scheduled(v, edit, num_steps), img, timesteps, callback=callback, progress=progress)
