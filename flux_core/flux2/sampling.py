"""Sampling math for FLUX.2: noise, tokens and 4-axis ids, reference images, the schedule, the loop.

Mirrors `src/flux2/sampling.py` and the generation path of `scripts/cli.py` in
black-forest-labs/flux2. A pipeline strings these together:

    get_noise -> prepare (+ prepare_references) -> get_schedule -> denoise -> unpack -> ae.decode

Time convention (as FLUX.1, flux_core/sampling.py): t = 1 is pure noise, t = 0 is data; the model
predicts the velocity v = eps - x0; Euler: x <- x + (t_next - t) v.

Differences from FLUX.1 that this file encodes:
- The autoencoder already patchifies 2x2 (flux_core/flux2/autoencoder.py), so the latent grid is
  (B, C=128, h, w) with one token per cell: packing is a plain flatten, and noise is drawn directly in
  that shape, (1, 128, H // 16, W // 16) (cli.py), not at 2x resolution and then packed.
- Position ids have four axes (t, h, w, l), int64 as the official `torch.cartesian_prod` of
  `torch.arange`s builds them: image tokens (t, row, col, 0); text tokens (0, 0, 0, index), so the
  text's order is in the rope too; reference image i has t = 10 + 10 i (`encode_image_refs`).
- No pooled vector (`vec`): the model takes (img, img_ids, timesteps, txt, txt_ids, guidance).
- The schedule's shift mu comes from an empirical fit in both the token count and the step count
  (`compute_empirical_mu`), not FLUX.1's line in the token count alone.

Letters: B batch, C latent channels (128), h/w latent rows/cols (= pixels / 16), N = h*w image
tokens, M reference tokens, T text tokens, D text channels.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

from ..sampling import StepCallback, check_image_size, euler, scheduled, seeded_randn, time_shift
from ..seam import EditSchedule

PIXELS_PER_TOKEN = 16  # autoencoder downsampling 8 x 2x2 patches (cli.py: `height // 16`)
LATENT_CHANNELS = 128  # 4 x 32 autoencoder channels (cli.py: `shape = (1, 128, height // 16, width // 16)`)
# encode_image_refs: reference i sits at time coordinate REF_T_SCALE + REF_T_SCALE * i.
REF_T_SCALE = 10
# encode_image_refs caps reference images at this many pixels (one reference / several).
REF_PIXELS_ONE, REF_PIXELS_MANY = 2024**2, 1024**2
# compute_empirical_mu: mu is linear in the token count, fitted at 10 and at 200 steps, and linear in
# the step count between; beyond 4300 tokens the 200-step line is used for any step count.
MU_FIT_10 = (8.73809524e-05, 1.89833333)  # (a1, b1): mu = a1 * tokens + b1 at 10 steps
MU_FIT_200 = (0.00016927, 0.45666666)  # (a2, b2): mu = a2 * tokens + b2 at 200 steps
MU_LARGE_IMAGE_TOKENS = 4300


# ----------------------------------------------------------------------------- noise


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    seed: int | Sequence[int],
    channels: int = LATENT_CHANNELS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Gaussian noise (B, channels, H/16, W/16) in `dtype` (bf16, as cli.py), from a seeded generator.

    cli.py draws `torch.randn((1, 128, H // 16, W // 16), generator=torch.Generator("cuda").manual_seed(seed),
    dtype=torch.bfloat16, device="cuda")`. Here the generator is on the CPU (then moved to `device`), so a
    seed gives the same noise on any machine; it equals the official draw made with a CPU generator.
    An int seed is one generator for the batch; a list gives each sample its own (flux_core.sampling).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    check_image_size(height, width, PIXELS_PER_TOKEN)
    shape = (channels, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)
    return seeded_randn(num_samples, shape, seed, dtype).to(device)  # (B, C, h, w)


# ----------------------------------------------------------------------------- tokens and ids


def grid_ids(rows: int, cols: int, t: int = 0) -> Tensor:
    """Ids (t, row, col, 0) of a rows x cols grid, row-major: (rows * cols, 4) int64 (official prc_img)."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(rows), torch.arange(cols), torch.arange(1))


def pack(x: Tensor) -> Tensor:
    """Latent grid to tokens, row-major: (B, C, h, w) -> (B, N, C) (official prc_img)."""
    if x.ndim != 4:
        raise ValueError(f"pack expects latents (B, C, h, w); got shape {tuple(x.shape)}")
    return rearrange(x, "B C h w -> B (h w) C")


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Tokens of the generated image back to its grid: (B, N, C) -> (B, C, H/16, W/16).

    The official `scatter_ids` places tokens by their ids; for the generated image (t = 0, a full
    row-major grid) that is this reshape (checked against it in the tests).
    """
    rows, cols = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    if x.ndim != 3 or x.shape[1] != rows * cols:
        raise ValueError(
            f"unpack of a {height}x{width} px image expects (B, {rows * cols}, C) tokens; got {tuple(x.shape)}"
        )
    return rearrange(x, "B (h w) C -> B C h w", h=rows, w=cols)


def img_ids(batch: int, rows: int, cols: int, t: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """Ids of a rows x cols latent grid, (B, N, 4) int64: (t, row, col, 0); t = 0 for the generated image."""
    return repeat(grid_ids(rows, cols, t), "N four -> B N four", B=batch).to(device)


def txt_ids(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    """Ids of T text tokens, (B, T, 4) int64: (0, 0, 0, index) (official prc_txt)."""
    ids = torch.cartesian_prod(
        torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)
    )  # (T, 4)
    return repeat(ids, "T four -> B T four", B=batch).to(device)


@dataclass(frozen=True)
class ModelInputs:
    """What the transformer takes besides the time and guidance: image and text tokens and their ids."""

    img: Tensor  # (B, N, C)
    img_ids: Tensor  # (B, N, 4)
    txt: Tensor  # (B, T, D)
    txt_ids: Tensor  # (B, T, 4)


def prepare(img: Tensor, txt: Tensor) -> ModelInputs:
    """Latent noise (B, C, h, w) and text features (B or 1, T, D) as tokens with ids, on img's device.

    The official batched_prc_img / batched_prc_txt, with a batch-1 txt repeated to img's batch.
    """
    if img.ndim != 4 or txt.ndim != 3:
        raise ValueError(
            f"prepare expects img (B, C, h, w) and txt (B, T, D); got {tuple(img.shape)}, {tuple(txt.shape)}"
        )
    bs = img.shape[0]
    if txt.shape[0] not in (1, bs):
        raise ValueError(f"txt batch {txt.shape[0]} for an img batch of {bs}: give 1 or {bs}")
    txt = repeat(txt, "1 T D -> B T D", B=bs) if txt.shape[0] == 1 else txt  # (B, T, D)
    return ModelInputs(
        img=pack(img),  # (B, N, C)
        img_ids=img_ids(bs, *img.shape[-2:], device=img.device),  # (B, N, 4)
        txt=txt.to(img.device),  # (B, T, D)
        txt_ids=txt_ids(bs, txt.shape[1], device=img.device),  # (B, T, 4)
    )


# ----------------------------------------------------------------------------- reference images


@dataclass(frozen=True)
class References:
    """Reference images as tokens: appended after the generated image's tokens at every step, their
    prediction dropped (official denoise's img_cond_seq / img_cond_seq_ids)."""

    img: Tensor  # (B, M, C) all references' tokens, in order
    ids: Tensor  # (B, M, 4) reference i at t = 10 + 10 i


def prepare_references(latents: Sequence[Tensor], batch: int = 1) -> References:
    """Encoded reference images [(1, C, h_i, w_i), ...] (sizes may differ) as one token sequence.

    Official `encode_image_refs`: reference i gets time coordinate 10 + 10 i and its own (row, col)
    grid; all references are concatenated along the sequence. The official code is batch 1; here the
    result is repeated to `batch` (as diffusers' Flux2Pipeline does).
    """
    if not latents:
        raise ValueError("prepare_references needs at least one encoded reference image")
    tokens, ids = [], []
    for i, latent in enumerate(latents):
        if latent.ndim != 4 or latent.shape[0] != 1:
            raise ValueError(
                f"reference {i} must be one encoded image (1, C, h, w); got shape {tuple(latent.shape)}"
            )
        tokens.append(pack(latent)[0])  # (M_i, C)
        ids.append(grid_ids(*latent.shape[-2:], t=REF_T_SCALE + REF_T_SCALE * i))  # (M_i, 4)
    img = repeat(torch.cat(tokens), "M C -> B M C", B=batch)  # (B, M, C)
    return References(img, repeat(torch.cat(ids), "M four -> B M four", B=batch).to(img.device))  # (B, M, 4)


def capped_size(width: int, height: int, num_references: int) -> tuple[int, int]:
    """(width, height) a reference image is resized to before its crop (official cap_pixels): above the
    pixel cap (2024^2 for a single reference, 1024^2 each for several) scaled down keeping the aspect
    ratio, int() of each side; unchanged below it."""
    if num_references < 1:
        raise ValueError(f"num_references must be >= 1; got {num_references}")
    limit = REF_PIXELS_ONE if num_references == 1 else REF_PIXELS_MANY
    if width * height > limit:
        scale = math.sqrt(limit / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width, height


def reference_size(width: int, height: int, num_references: int) -> tuple[int, int]:
    """(width, height) a reference image is brought to before encoding (official default_prep):
    capped_size, then centre-cropped to multiples of 16."""
    width, height = capped_size(width, height, num_references)
    return width // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN, height // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN


# ----------------------------------------------------------------------------- schedule


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The schedule shift mu for N image tokens and a number of steps (official compute_empirical_mu).

    Two lines in N, fitted at 10 and 200 steps, interpolated (and extrapolated) linearly in the step
    count; above 4300 tokens (about 1088 x 1088 px) the 200-step line alone.
    """
    a1, b1 = MU_FIT_10
    a2, b2 = MU_FIT_200
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > MU_LARGE_IMAGE_TOKENS:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0  # per step, between the 10- and 200-step fits
    return float(slope * num_steps + (m_200 - 200.0 * slope))


def get_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 times from 1 to 0: a float32 linspace through time_shift (sigma 1) at the empirical mu."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1; got {num_steps!r}")
    mu = compute_empirical_mu(image_seq_len, num_steps)
    return time_shift(mu, 1.0, torch.linspace(1, 0, num_steps + 1)).tolist()


# ----------------------------------------------------------------------------- the Euler loop

# model(img, img_ids, timesteps, txt, txt_ids, guidance[, edit=]) -> velocity (B, N [+ M], C); ids (B, L, 4).
Flux2Model = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None], Tensor]


class Velocity:
    """The FLUX.2 model as the ODE's right-hand side, v(x, t[, edit]): what every step shares (ids, text,
    guidance, reference tokens, the negative prompt of true CFG) held once. denoise is an Euler loop
    over it; the fluxspace pipeline integrates the same object (as flux_core.sampling.Velocity for FLUX.1).

    dtype: the dtype the model is called in; None calls it in the latent's own dtype, as the official
    loop does (bf16 noise: the official bf16 run). t and the guidance scale are built in the latent's
    dtype (official: `torch.full(..., dtype=img.dtype)`) and then cast to `dtype`.
    guidance: FLUX.2 [dev]'s distilled guidance (4.0 in cli.py); None for a model without a guidance
    embedding (klein), which then receives None.
    neg_txt, cfg_scale: true classifier-free guidance (FLUX.2 [klein] base models; diffusers
    Flux2KleinPipeline): the prompt and the negative prompt run as one forward of batch 2B and
    v = v_neg + cfg_scale (v_pos - v_neg). cfg_scale 1 is one plain forward.
    references: reference images' tokens (prepare_references), after the image's at every step; the
    velocity predicted for them is dropped.
    """

    def __init__(
        self,
        model: Flux2Model,
        img_ids: Tensor,  # (B, N, 4)
        txt: Tensor,  # (B, T, D)
        txt_ids: Tensor,  # (B, T, 4)
        guidance: float | None,
        *,
        references: References | None = None,
        neg_txt: Tensor | None = None,  # (B or 1, T, D)
        cfg_scale: float = 1.0,
        dtype: torch.dtype | None = None,
    ):
        bs, self.n_img = img_ids.shape[:2]
        if txt.shape[0] != bs or txt_ids.shape[:2] != txt.shape[:2]:
            raise ValueError(
                f"txt {tuple(txt.shape)} and txt_ids {tuple(txt_ids.shape)} must have the image's batch size {bs} "
                "and one id per token (prepare() builds them)"
            )
        ids, cond = img_ids, None
        if references is not None:
            if references.img.shape[0] != bs:
                raise ValueError(
                    f"references have batch {references.img.shape[0]}, the image {bs}: "
                    f"use prepare_references(..., batch={bs})"
                )
            ids = torch.cat([img_ids, references.ids.to(img_ids)], dim=1)  # (B, N+M, 4)
            cond = references.img  # (B, M, C)
        self.use_cfg = cfg_scale != 1.0
        if self.use_cfg:
            if neg_txt is None or neg_txt.shape[1:] != txt.shape[1:] or neg_txt.shape[0] not in (1, bs):
                got = "none" if neg_txt is None else str(tuple(neg_txt.shape))
                raise ValueError(f"cfg_scale={cfg_scale} needs neg_txt of shape (1 or {bs}, {txt.shape[1]}, "
                                 f"{txt.shape[2]}) (the negative prompt's features); got {got}")  # fmt: skip
            ids, txt_ids = torch.cat([ids, ids]), torch.cat([txt_ids, txt_ids])  # (2B, L, 4)
            txt = torch.cat([txt, neg_txt.expand(bs, -1, -1).to(txt)])  # (2B, T, D): [positive ; negative]
            cond = None if cond is None else torch.cat([cond, cond])
        self.model, self.guidance, self.cfg_scale, self.dtype = model, guidance, cfg_scale, dtype
        self.ids, self.txt, self.txt_ids, self.cond = ids, txt, txt_ids, cond

    def __call__(self, img: Tensor, t: float, edit=None) -> Tensor:
        """The (guided) velocity at latent img (B, N, C) and time t, in img's dtype. edit: this step's
        edit (flux_core.seam.Edit) or None, which calls the model exactly as without one."""
        dtype = img.dtype if self.dtype is None else self.dtype
        n = self.ids.shape[0]
        t_vec = torch.full((n,), t, dtype=img.dtype, device=img.device).to(dtype)  # (B or 2B,)
        g = (
            None
            if self.guidance is None
            else torch.full((n,), self.guidance, dtype=img.dtype, device=img.device)
        )
        x = img.to(dtype)  # (B, N, C)
        x = torch.cat([x, x]) if self.use_cfg else x  # (B or 2B, N, C)
        if self.cond is not None:
            x = torch.cat([x, self.cond.to(x)], dim=1)  # (B or 2B, N+M, C): the references after the image
        extra = {"edit": edit} if edit is not None else {}
        txt = self.txt.to(dtype)
        pred = self.model(x, self.ids, t_vec, txt, self.txt_ids, None if g is None else g.to(dtype), **extra)
        pred = pred[:, : self.n_img].to(img.dtype)  # (B or 2B, N, C): the references' prediction dropped
        if self.use_cfg:
            v_pos, v_neg = pred.chunk(2)  # (B, N, C) each
            pred = v_neg + self.cfg_scale * (v_pos - v_neg)  # (B, N, C)
        return pred


def denoise(
    model: Flux2Model,
    img: Tensor,  # (B, N, C) packed noise
    img_ids: Tensor,  # (B, N, 4)
    txt: Tensor,  # (B, T, D)
    txt_ids: Tensor,  # (B, T, 4)
    timesteps: Sequence[float],
    guidance: float | None,
    *,
    references: References | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    edit: EditSchedule | None = None,
) -> Tensor:
    """Euler from timesteps[0] to timesteps[-1], as the official denoise. Returns (B, N, C) in img's dtype.

    Everything runs in img's dtype as in the official loop (bf16 noise from get_noise gives the
    official bf16 run): t and the guidance scale are built in it, the update is done in it.
    guidance, references: as Velocity's.
    edit: an EditSchedule (flux_core.seam), asked for each step's edit (None: a plain step), as FLUX.1's
    denoise. FluxSpace's schedule edits the first N image tokens only (FluxSpaceSchedule(...,
    n_generated=N)); the references keep their plain attention outputs unless it edits them too.
    With edit=None, or a schedule that returns None, the model is called exactly as without one.
    """
    if img.ndim != 3 or img_ids.shape[:2] != img.shape[:2] or txt.shape[0] != img.shape[0]:
        raise ValueError(
            "denoise expects img (B, N, C), img_ids (B, N, 4), txt (B, T, D), txt_ids (B, T, 4) with one batch "
            "size (prepare() builds them); got "
            + ", ".join(str(tuple(x.shape)) for x in (img, img_ids, txt, txt_ids))
        )
    v = Velocity(model, img_ids, txt, txt_ids, guidance, references=references)
    return euler(scheduled(v, edit, len(timesteps) - 1), img, timesteps, callback=callback, progress=progress)
