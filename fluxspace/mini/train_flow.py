"""Training the flux-mini flow transformer: the rectified-flow loss on cached latents and captions.

Rectified flow (Liu et al. 2022; as trained for SD3, Esser et al. 2024, and FLUX.1) in this
codebase's time convention (flux_core/sampling.py: t = 1 noise, t = 0 data):

    x_t = (1 - t) x0 + t eps,      eps ~ N(0, I),      t = sigmoid(n), n ~ N(0, 1)  (logit-normal)
    loss = | v_theta(x_t, t, text) - (eps - x0) |^2

The velocity eps - x0 is what flux_core.sampling.denoise integrates, so a trained model needs no
other change to sample. Logit-normal t (SD3, section 3.1) spends most steps at middle times, where
the velocity is hardest to predict; both ends are nearly free.

Inputs are exactly what the sampler feeds the model: latents packed into 2x2 tokens with their ids
by flux_core.sampling.prepare, T5 token features as `txt` and the pooled CLIP vector as `y`, from
the frozen text encoders. The encoders never change, so each image's captions are encoded once into
a CaptionBank; a step only indexes it. Classifier-free guidance (Ho & Salimans 2022) needs the same
model to predict the unconditional velocity too: a caption is replaced by the empty prompt "" with
probability CAPTION_DROPOUT, on top of the ~10% empty captions the caption templates already draw.

Letters: B batch, N image tokens, T text tokens, C channels, U unique captions, K captions per image.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flux_core.conditioner import TextEncoders
from flux_core.model import Flux, FluxParams
from flux_core.sampling import prepare, prepare_condition

from .train import TrainConfig, TrainResult, fork_generator, train

# 5% dropout on top of the captions' own 10% empty ones: ~15% of steps learn the unconditional
# velocity, the upper end of the usual 10-20% (SD: 10%, Imagen: 10%, DiT: 10% of class labels).
CAPTION_DROPOUT = 0.05
EMPTY_PROMPT = ""


@dataclass(frozen=True)
class CaptionBank:
    """The text-encoder outputs of every caption of a data set, encoded once.

    Row 0 is always the empty prompt (the CFG negative). `ids[i, k]` is the row of caption k of
    image i. Features are kept in bf16, as the official code runs T5: half the memory, and the
    bank (tens of thousands of captions) is the largest thing a training run holds.
    """

    txt: Tensor  # (U, T, C_t5) bf16
    vec: Tensor  # (U, C_clip) bf16
    ids: Tensor  # (N, K) int64
    captions: tuple[str, ...]  # the U unique captions, row order


@torch.no_grad()
def encode_captions(text: TextEncoders, captions: list[list[str]], batch_size: int = 256) -> CaptionBank:
    """Encode the unique captions of `captions` (K per image) with the frozen text encoders."""
    if len({len(c) for c in captions}) != 1:
        raise ValueError("every image needs the same number of captions (caption_sets draws K per image)")
    rows = {EMPTY_PROMPT: 0}
    for caption_list in captions:
        for caption in caption_list:
            rows.setdefault(caption, len(rows))
    unique = list(rows)
    txt, vec = [], []
    for i in range(0, len(unique), batch_size):
        t, v = text(unique[i : i + batch_size])  # (b, T, C_t5), (b, C_clip)
        txt.append(t.to(torch.bfloat16).cpu())
        vec.append(v.to(torch.bfloat16).cpu())
    ids = torch.tensor([[rows[c] for c in caption_list] for caption_list in captions], dtype=torch.int64)
    return CaptionBank(torch.cat(txt), torch.cat(vec), ids, tuple(unique))


def init_flux(params: FluxParams, seed: int) -> Flux:
    """A fresh Flux with the DiT initialisation (Peebles & Xie 2023, section 3.2, "adaLN-Zero").

    Linear weights Xavier-uniform with zero biases; the time and vector embedders N(0, 0.02^2); every
    modulation and the final layer zero, so each block starts as the identity (all gates 0) and the
    model starts by predicting v = 0. DiT found this trains faster and more stably than the default.
    """
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        model = Flux(params)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for embedder in (model.time_in, model.vector_in):
            for linear in (embedder.in_layer, embedder.out_layer):
                nn.init.normal_(linear.weight, std=0.02)
        zero = [model.final_layer.linear, model.final_layer.adaLN_modulation[1]]
        zero += [m for block in model.double_blocks for m in (block.img_mod.lin, block.txt_mod.lin)]
        zero += [block.modulation.lin for block in model.single_blocks]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    return model


def rectified_flow_loss(model: Flux, latents: Tensor, txt: Tensor, vec: Tensor, generator: torch.Generator,
                        condition: Tensor | None = None) -> Tensor:  # fmt: skip
    """The loss of one batch: latents (B, Z, h, w) normalised as AutoEncoder.encode returns them,
    txt (B, T, C_t5), vec (B, C_clip). Noise and t are drawn on the latents' device, seeded from `generator`.
    condition: Kontext training, the latents (B, Z, h', w') of the images being edited: their tokens
    follow the noisy ones, as the sampler appends them (flux_core.sampling.Condition), and the loss
    is on the noisy tokens' velocity only."""
    inp = prepare(latents, txt, vec)  # packed img (B, N, Z*4) and ids, as the sampler builds them
    x0 = inp.img  # (B, N, C)
    g = fork_generator(generator, x0.device)
    eps = torch.randn(x0.shape, generator=g, device=x0.device)  # (B, N, C)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=g, device=x0.device))  # (B,) logit-normal
    t_ = rearrange(t, "B -> B 1 1")
    x_t = (1 - t_) * x0 + t_ * eps  # (B, N, C)
    img, ids = x_t, inp.img_ids
    if condition is not None:
        cond = prepare_condition(condition)
        img, ids = torch.cat([x_t, cond.img], dim=1), torch.cat([ids, cond.ids], dim=1)  # (B, N+M, C), (B, N+M, 3)
    v = model(img=img, img_ids=ids, txt=inp.txt, txt_ids=inp.txt_ids, timesteps=t, y=inp.vec)[:, : x0.shape[1]]  # (B, N, C)
    return F.mse_loss(v.float(), eps - x0)


def caption_loss(
    latents: Tensor, bank: CaptionBank, batch_size: int, caption_dropout: float, device: str | torch.device
) -> Callable[[Flux, torch.Generator], tuple[Tensor, dict]]:
    """The loss function of train.train on (latents (N, Z, h, w), bank.ids (N, K)): each call draws a
    batch of images, one of each image's captions (or "" with probability caption_dropout), then the
    rectified-flow loss of `model` on them. Shared by train_flow and the LoRA trainer (train_lora.py)."""
    if latents.shape[0] != bank.ids.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but captions for {bank.ids.shape[0]} images")
    # The data lives on the training device; the indices into it are drawn on the CPU.
    latents = latents.to(device, torch.float32)
    txt, vec, ids = bank.txt.to(device), bank.vec.to(device), bank.ids.cpu()
    n, k = ids.shape

    def loss_fn(model: Flux, generator: torch.Generator):
        # Indices drawn on the CPU generator (resumable, same on every device), then moved.
        index = torch.randint(n, (batch_size,), generator=generator)
        which = torch.randint(k, (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        rows = torch.where(dropped, 0, ids[index, which]).to(device)  # (B,) row 0 is ""
        x0 = latents[index.to(device)]  # (B, Z, h, w)
        loss = rectified_flow_loss(model, x0, txt[rows].float(), vec[rows].float(), generator)
        return loss, {}

    return loss_fn


def train_flow(
    latents: Tensor,
    bank: CaptionBank,
    params: FluxParams,
    config: TrainConfig,
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    resume: bool = False,
    caption_dropout: float = CAPTION_DROPOUT,
    **kwargs,
) -> TrainResult:
    """Train a fresh flux-mini transformer on (latents (N, Z, h, w), bank.ids (N, K)); kwargs go to train.train."""
    model = init_flux(params, config.seed)
    loss_fn = caption_loss(latents, bank, config.batch_size, caption_dropout, device)
    return train(model, loss_fn, config, folder, device, resume=resume, desc="flow", **kwargs)
