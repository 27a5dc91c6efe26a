"""Training the flux-mini autoencoder, and measuring it: reconstruction PSNR and the latent statistics.

The model is flux_core's AutoEncoder (the FLUX.1 VAE class) at the flux-mini config. It is trained
as the LDM / Stable Diffusion VAE was (Rombach et al. 2022, appendix G), minus the adversarial and
perceptual terms, which flat cartoons do not need:

    loss = |D(z) - x|_1  +  GRAD_WEIGHT * |grad D(z) - grad x|_1  +  KL_WEIGHT * KL(q(z|x) || N(0, 1))
    z = mean + exp(logvar / 2) * eps          (the reparameterised posterior sample)

The decoder learns from posterior samples, so it also decodes the slightly-off latents a flow
model produces; at inference the encoder's mean is used (AutoEncoder.encode). The image gradient
term weighs edges: an L1 on pixels alone blurs the 1-2 px ink lines of the sketch style first.

Training works on the raw encoder/decoder. Only afterwards are the latents normalised:
shift_factor = their mean and scale_factor = 1 / their std (as FLUX.1's 0.1159 and 0.3611 were
measured), so the flow model sees latents of unit variance, like its N(0, 1) noise.

Letters: B batch, C channels, H height, W width.
"""

import dataclasses
import os

import torch
from einops import rearrange
from torch import Tensor

from flux_core.autoencoder import AutoEncoder, AutoEncoderParams

from .data import Faces
from .train import TrainConfig, TrainResult, fork_generator, train

# The KL only keeps the posterior a Gaussian of sane scale; it must not cost reconstruction. LDM uses
# 1e-6 on per-image sums; on our per-element means 1e-5 is still ~1% of the loss at 30 dB.
KL_WEIGHT = 1e-5
GRAD_WEIGHT = 0.5
# LDM's DiagonalGaussianDistribution clamps logvar to this range so exp() never overflows in training.
LOGVAR_RANGE = (-30.0, 20.0)


def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal and vertical finite differences. (B, C, H, W) -> (B, C, H, W-1), (B, C, H-1, W)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def autoencoder_loss(
    ae: AutoEncoder, x: Tensor, generator: torch.Generator
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of a batch of images x (B, 3, H, W) in [-1, 1]; returns (loss, parts)."""
    mean, logvar = torch.chunk(ae.encoder(x), 2, dim=1)  # (B, Z, h, w) each
    logvar = logvar.clamp(*LOGVAR_RANGE)
    g = fork_generator(generator, mean.device)
    eps = torch.randn(mean.shape, generator=g, device=mean.device)  # (B, Z, h, w)
    z = mean + torch.exp(0.5 * logvar) * eps  # (B, Z, h, w)
    rec = ae.decoder(z)  # (B, 3, H, W)

    l1 = (rec - x).abs().mean()
    (rx, ry), (tx, ty) = image_gradients(rec), image_gradients(x)
    grad = 0.5 * ((rx - tx).abs().mean() + (ry - ty).abs().mean())
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + GRAD_WEIGHT * grad + KL_WEIGHT * kl
    return loss, {"l1": l1, "grad": grad, "kl": kl}


def train_autoencoder(
    faces: Faces,
    params: AutoEncoderParams,
    config: TrainConfig,
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    resume: bool = False,
    **kwargs,
) -> TrainResult:
    """Train a fresh AutoEncoder(params) on random batches of `faces`; kwargs go to train.train."""
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
        torch.manual_seed(config.seed)
        ae = AutoEncoder(params)

    # The uint8 renders go to the training device once (1 GB for 20k faces): converting and copying
    # every batch from the CPU would cost a GPU step more than the step itself.
    images = torch.from_numpy(faces.images).to(device)  # (N, H, W, 3) uint8

    def loss_fn(model: AutoEncoder, generator: torch.Generator):
        index = torch.randint(len(faces), (config.batch_size,), generator=generator).to(device)
        x = rearrange(images[index], "B H W C -> B C H W").float() / 127.5 - 1.0  # (B, 3, H, W), as render.to_tensor
        return autoencoder_loss(model, x, generator)

    return train(ae, loss_fn, config, folder, device, resume=resume, desc="autoencoder", **kwargs)


@torch.no_grad()
def posterior_means(ae: AutoEncoder, faces: Faces, batch_size: int = 64, device="cpu") -> Tensor:
    """Raw encoder means (n, Z, h, w) on the CPU, float32: no scale or shift applied."""
    out = []
    for i in range(0, len(faces), batch_size):
        x = faces.tensor(slice(i, i + batch_size)).to(device)  # (B, 3, H, W)
        mean, _ = torch.chunk(ae.encoder(x), 2, dim=1)  # (B, Z, h, w)
        out.append(mean.float().cpu())
    return torch.cat(out)


def latent_normalisation(ae: AutoEncoder, faces: Faces, device="cpu") -> tuple[float, float]:
    """(scale_factor, shift_factor) = (1 / std, mean) of the posterior means over `faces`, all channels."""
    means = posterior_means(ae, faces, device=device).double()
    return 1.0 / means.std().item(), means.mean().item()


def with_normalisation(ae: AutoEncoder, scale_factor: float, shift_factor: float) -> AutoEncoder:
    """The same weights under params carrying the measured scale and shift (params are frozen)."""
    params = dataclasses.replace(ae.params, scale_factor=scale_factor, shift_factor=shift_factor)
    normalised = AutoEncoder(params).to(next(ae.parameters()).device)
    normalised.load_state_dict(ae.state_dict())
    return normalised.eval().requires_grad_(False)


@torch.no_grad()
def psnr_db(a: Tensor, b: Tensor) -> Tensor:
    """(B,) PSNR in dB between image batches in [-1, 1], on the [0, 1] scale; identical images give
    120 dB (an MSE floor of 1e-12) rather than infinity, which JSON cannot hold."""
    mse = ((a.float() - b.float()) / 2).square().flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def psnr(ae: AutoEncoder, faces: Faces, batch_size: int = 64, device="cpu") -> float:
    """Mean PSNR in dB of encode -> decode (posterior mean, as at inference) over `faces`, on [0, 1] pixels."""
    values = []
    for i in range(0, len(faces), batch_size):
        x = faces.tensor(slice(i, i + batch_size)).to(device)  # (B, 3, H, W)
        rec = ae.decode(ae.encode(x)).clamp(-1, 1)  # (B, 3, H, W)
        values += psnr_db(rec, x).tolist()
    return sum(values) / len(values)
