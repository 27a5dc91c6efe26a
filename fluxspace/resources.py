"""Will a run fit? Its memory, estimated from the files' headers and the settings before anything is
loaded, against what the device has.

    weights      every tensor of the transformer, autoencoder and text encoders, in the run's dtype;
                 with --weights fp8 the transformer's block Linear weights at one byte each
    activations  one transformer forward: rows (batch x 2 under true CFG) x tokens x width x
                 ACTIVATION_FACTOR, plus FluxSpace's extra conditions; the transformer's attention
                 runs in fused kernels (flux_core.math, fluxspace/attention.py), which never hold the
                 L x L scores. Then the autoencoder: its decoder at full resolution, and its
                 mid-block attention, which does hold the scores over all latent positions (quadratic:
                 1 GiB at 1024 x 1024 px in float32, 16 GiB at 2048 x 2048).

An estimate, on the generous side: a run refused here would not have fitted; one accepted may still
fail on a device shared with other work, and then torch's own out-of-memory error says so.
"""

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flux_core import FluxParams
from flux_core.autoencoder import AutoEncoderParams
from flux_core.conditioner import TEXT_ENCODER_FOLDERS
from flux_core.files import open_weights, read_header

GiB = 2**30
# Live tensors of one block, in multiples of rows x tokens x width: q, k, v, the attention output,
# the MLP's hidden layer (mlp_ratio 4), the residual stream and the modulated input, with headroom.
ACTIVATION_FACTOR = 16
# The decoder's full-resolution level holds about this many feature maps of ch channels at once.
DECODER_FACTOR = 4


@dataclass(frozen=True)
class Footprint:
    weights: int  # bytes
    activations: int  # bytes
    rows: int  # transformer batch rows
    tokens: int  # image + text tokens per row

    @property
    def total(self) -> int:
        return self.weights + self.activations


# What FLUX.2's text encoder does not load of its LLM checkpoint (it runs the language model's layers
# only): the output head, and Mistral3's vision tower and projector.
NOT_LOADED_TEXT = re.compile(r"(^|\.)(lm_head|vision_tower|multi_modal_projector)\.")


def part_weights(paths) -> dict[str, int]:
    """Parameters of each part of a models.ModelPaths (flow, ae, text: T5 and CLIP together, or the
    FLUX.2 LLM's language model), from their headers."""
    counts = {
        "flow": sum(math.prod(s) for s in open_weights(paths.transformer, "transformer").shapes.values()),
        "ae": sum(math.prod(s) for s in open_weights(paths.ae, "ae").shapes.values()),
        "text": 0,
    }
    for folder in TEXT_ENCODER_FOLDERS[:2]:  # text_encoder/, text_encoder_2/: the two models
        for file in sorted((Path(paths.text_encoders) / folder).glob("*.safetensors")):
            shapes = read_header(file)[0]
            counts["text"] += sum(math.prod(s) for k, s in shapes.items() if not NOT_LOADED_TEXT.search(k))
    return counts


# The text encoder's layers that offload "blocks" streams (runtime._streamed_lists), by folder and key:
# T5's encoder blocks (FLUX.1: text_encoder_2/), the decoder layers of FLUX.2's LLM (text_encoder/;
# Mistral3's vision tower, which never runs for text, has layers too and is not counted here).
STREAMED_TEXT_LAYERS = {
    "flux1": ("text_encoder_2", re.compile(r"^encoder\.block\.(\d+)\.")),
    "flux2": ("text_encoder", re.compile(r"^(?!.*vision).*\blayers\.(\d+)\.")),
}


def text_layer_weights(paths, family: str) -> list[int]:
    """Parameters of each streamed layer of the text encoder in `paths` (FLUX.1: T5's blocks; FLUX.2: the
    LLM's decoder layers), from the headers; [] where there are none."""
    folder, pattern = STREAMED_TEXT_LAYERS[family]
    layers: dict[int, int] = {}
    for file in sorted((Path(paths.text_encoders) / folder).glob("*.safetensors")):
        for key, shape in read_header(file)[0].items():
            found = pattern.match(key)
            if found:
                layers[int(found.group(1))] = layers.get(int(found.group(1)), 0) + math.prod(shape)
    return [layers[k] for k in sorted(layers)]


def weight_bytes(n_weights: int, n_fp8: int, dtype: torch.dtype) -> int:
    """Bytes of n_weights parameters in `dtype`, n_fp8 of them held as float8 (one byte each)."""
    size = torch.empty((), dtype=dtype).element_size()
    return (n_weights - n_fp8) * size + n_fp8


def footprint(
    weights: int, params: FluxParams, ae: AutoEncoderParams, t5_length: int, width: int, height: int,
    pixels_per_token: int, batch: int, cfg: bool, conditions: int, dtype: torch.dtype,
) -> Footprint:  # fmt: skip
    """The memory of a run; weights: bytes of weights on the device (runtime.resident_bytes); conditions:
    extra text conditions of a FluxSpace edit (prior + concepts)."""
    size = torch.empty((), dtype=dtype).element_size()
    n_img = (height // pixels_per_token) * (width // pixels_per_token)
    rows = batch * (2 if cfg else 1)
    tokens = n_img + t5_length
    per_row = tokens * params.hidden_size * ACTIVATION_FACTOR
    # FluxSpace: each condition's text stream through the double blocks, and its image-text
    # attention output merged in float32 with the shared image-image part.
    per_row += conditions * (t5_length * params.hidden_size * ACTIVATION_FACTOR + 3 * n_img * params.hidden_size * 2)
    decoder = batch * ae.ch * ae.ch_mult[0] * width * height * DECODER_FACTOR * size
    # The autoencoder's mid-block attention runs over every latent position at once, and its
    # channel width (ch x 4) is beyond the fused CPU kernels: the P x P scores are held.
    positions = (height // ae.downsampling) * (width // ae.downsampling)
    decoder = max(decoder, batch * positions**2 * size)
    return Footprint(weights, max(rows * per_row * size, decoder), rows, tokens)


def available(device: str | torch.device) -> int | None:
    """Bytes the device can still give: free GPU memory, or the OS's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_fits(need: Footprint, device: str | torch.device, what: str) -> None:
    """Refuse, with the estimate and the limit, a run the device cannot hold. what: e.g. '64x64 px, batch 1'."""
    have = available(device)
    if have is not None and need.total > have:
        raise ValueError(
            f"this run needs about {need.total / GiB:.1f} GiB ({need.weights / GiB:.1f} weights, "
            f"{need.activations / GiB:.1f} activations for {need.rows} rows of {need.tokens} tokens: {what}) but "
            f"{device} has {have / GiB:.1f} GiB available; use a smaller size or batch, bfloat16, or a larger device"
        )
