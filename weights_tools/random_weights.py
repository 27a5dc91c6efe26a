"""Seeded random checkpoints in the official layout, for tests, smoke runs and CPU benchmarks.

    DIR/flux1-<name>.safetensors   the transformer, <name> = preset name without "flux-"
                                   (flux-dev -> flux1-dev.safetensors, tiny -> flux1-tiny.safetensors;
                                   a pruned model: flux1-dev-d2s1.safetensors for --depth 2 --depth-single 1)
    DIR/ae.safetensors             the autoencoder, float32 like the official file
    DIR/text_encoder*/, tokenizer*/  small random T5 / CLIP folders (small presets only), sized from
                                   the preset (weights_tools.text_encoders.install_text_encoders)

Keys and shapes are those of the preset's meta-device model; the metadata records what no tensor
shape says (RoPE axes and theta, the AE's scale/shift, the preset name; see flux_core.loading), so
`load_flow_model(path)` needs no preset.

Values: every tensor is drawn from its own generator, seeded from (seed, key), so the same seed
gives identical files, and a pruned model shares its blocks' values with the full one. Weights and
biases are N(0, 0.02^2); norm scales are 1 + N(0, 0.02^2). Every layer of Flux and of the AE is
pre-normalised, so a forward pass on these stays finite at any depth.

Tensors are generated and written one at a time (float32 for one tensor, then cast): writing the
12B presets needs one tensor of memory, not a float32 copy of the model.
"""

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flux_core.autoencoder import AutoEncoder
from flux_core.conditioner import TEXT_ENCODER_FOLDERS
from flux_core.files import CheckpointError, dtype_named
from flux_core.inference import ae_metadata, flux_metadata
from flux_core.model import Flux
from flux_core.presets import Preset, get_preset

from .convert import check_writable, write_safetensors

WEIGHT_STD = 0.02
# Transformer dtypes offered (names of flux_core.files.DTYPES): float16 is not how FLUX.1 ships.
DTYPE_CHOICES = ("float32", "bfloat16")
# Presets up to this many transformer parameters also get random text encoders (the 12B ones would
# need a 4.7B T5: pointless for tests, and the real encoders are what one benchmarks with).
SMALL_PRESET_PARAMS = 100_000_000


def tensor_seed(seed: int, key: str) -> int:
    """A generator seed for one tensor, stable across runs, platforms and key order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def is_norm_scale(key: str, shape: tuple[int, ...]) -> bool:
    """RMSNorm `.scale` (transformer) and GroupNorm `.weight` (AE: the only 1-D weights)."""
    return key.endswith(".scale") or (key.endswith(".weight") and len(shape) == 1)


def random_tensor(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(tensor_seed(seed, key))
    t = torch.randn(shape, generator=g, dtype=torch.float32) * WEIGHT_STD
    if is_norm_scale(key, shape):
        t += 1.0
    return t.to(dtype)


def meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write_random_file(
    path: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    dtype: torch.dtype,
    metadata: dict[str, str],
    force: bool = False,
) -> Path:
    keys = sorted(shapes)
    plan = [(k, shapes[k], dtype) for k in keys]
    tensors = ((k, random_tensor(k, shapes[k], seed, dtype)) for k in keys)
    return write_safetensors(path, plan, tensors, metadata={"format": "pt", **metadata}, force=force)


@dataclass
class RandomCheckpoint:
    transformer: Path
    ae: Path | None = None
    text_encoders: Path | None = None
    notes: list[str] = field(default_factory=list)


def transformer_filename(preset: Preset, depth: int | None, depth_single: int | None) -> str:
    name = preset.name.removeprefix("flux-")
    if depth is not None or depth_single is not None:
        name += f"-d{preset.params.depth if depth is None else depth}"
        name += f"s{preset.params.depth_single_blocks if depth_single is None else depth_single}"
    return f"flux1-{name}.safetensors"


def write_random_checkpoint(
    preset: str,
    out: str | os.PathLike,
    seed: int = 0,
    dtype: str = "bfloat16",
    transformer_only: bool = False,
    depth: int | None = None,
    depth_single: int | None = None,
    force: bool = False,
) -> RandomCheckpoint:
    """Write the random checkpoint set of a preset into the folder `out` (see the module docstring)."""
    p = get_preset(preset)
    torch_dtype = dtype_named(dtype, DTYPE_CHOICES)
    for name, value in (("--depth", depth), ("--depth-single", depth_single)):
        if value is not None and value < 0:
            raise CheckpointError(f"{name} must be >= 0; got {value}")
    params = p.params
    if depth is not None or depth_single is not None:
        params = dataclasses.replace(
            params,
            depth=params.depth if depth is None else depth,
            depth_single_blocks=params.depth_single_blocks if depth_single is None else depth_single,
        )
        if params.depth == 0 and params.depth_single_blocks == 0:
            raise CheckpointError(
                "--depth 0 --depth-single 0 leaves no block: the loader could not read the head dim"
            )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    pruned = params != p.params
    flux_path = out / transformer_filename(p, depth, depth_single)
    ae_path = out / "ae.safetensors"
    with torch.device("meta"):
        flux_shapes = meta_shapes(Flux(params))
    small = sum(torch.Size(s).numel() for s in flux_shapes.values()) <= SMALL_PRESET_PARAMS
    with_text = not transformer_only and small
    # Check every target before writing anything, so a refusal leaves the folder as it was.
    check_writable(flux_path, force)
    if not transformer_only:
        check_writable(ae_path, force)
    if with_text and not force:
        for name in TEXT_ENCODER_FOLDERS:
            if (out / name).exists():
                raise CheckpointError(f"{out / name} already exists; pass --force to overwrite it")

    metadata = flux_metadata(params, preset=None if pruned else p.name)
    if pruned:
        metadata["fluxspace.pruned_from"] = p.name
    result = RandomCheckpoint(write_random_file(flux_path, flux_shapes, seed, torch_dtype, metadata, force))
    if transformer_only:
        return result
    with torch.device("meta"):
        ae_shapes = meta_shapes(AutoEncoder(p.ae_params))
    result.ae = write_random_file(ae_path, ae_shapes, seed, torch.float32, ae_metadata(p.ae_params), force)
    if with_text:
        # Imported here: it pulls in transformers and tokenizers, which the other commands do not need.
        from .text_encoders import install_text_encoders

        result.text_encoders = install_text_encoders(
            out,
            overwrite=force,
            t5_dim=p.params.context_in_dim,
            clip_dim=p.params.vec_in_dim,
            t5_max_length=p.t5_max_length,
            seed=seed,
        )
    else:
        result.notes.append(
            f"no text encoders for {p.name} (only for presets up to {SMALL_PRESET_PARAMS:,} parameters)"
        )
    return result
