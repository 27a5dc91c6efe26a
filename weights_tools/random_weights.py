"""Seeded random checkpoints in the official layout, for tests, smoke runs and CPU benchmarks.

FLUX.1 presets:
    DIR/flux1-<name>.safetensors   the transformer, <name> = preset name without "flux-"
                                   (flux-dev -> flux1-dev.safetensors, tiny -> flux1-tiny.safetensors;
                                   a pruned model: flux1-dev-d2s1.safetensors for --depth 2 --depth-single 1)
    DIR/ae.safetensors             the autoencoder, float32 like the official file
    DIR/text_encoder*/, tokenizer*/  small random T5 / CLIP folders (small presets only), sized from
                                   the preset (weights_tools.text_encoders.install_text_encoders)
FLUX.2 presets:
    DIR/flux2-<name>.safetensors   the transformer, <name> = preset name without "flux2-" / "-flux2"
                                   (flux2-dev -> flux2-dev.safetensors, as the official file; tiny-flux2 ->
                                   flux2-tiny.safetensors, tiny-flux2-dev -> flux2-tiny-dev.safetensors)
    DIR/ae.safetensors             the FLUX.2 autoencoder, float32 (BatchNorm statistics: mean ~0, var ~1)
    DIR/text_encoder/, tokenizer/  for small presets, a tiny random LLM in the preset's text slot: Qwen3
                                   for [klein] text (tiny-flux2; text_encoders.write_random_qwen3),
                                   Mistral3 for [dev] text (tiny-flux2-dev; write_random_mistral3); none
                                   for the full-size presets (their LLMs are 4-24B)

Keys and shapes are those of the preset's meta-device model; the metadata records what no tensor
shape says (RoPE axes and theta, the AE's scale/shift, the preset name; see flux_core.loading), so
`load_flow_model(path)` / `load_flux2_model(path)` need no preset.

Values: every tensor is drawn from its own generator, seeded from (seed, key), so the same seed
gives identical files, and a pruned model shares its blocks' values with the full one. Weights and
biases are N(0, 0.02^2); norm scales (and BatchNorm variances) are 1 + N(0, 0.02^2); integer buffers
(bn.num_batches_tracked) are 0. Every layer is pre-normalised, so a forward pass on these stays finite
at any depth.

Tensors are generated and written one at a time (float32 for one tensor, then cast): writing the
large presets needs one tensor of memory, not a float32 copy of the model. Sets above MAX_BYTES
(4 GiB: FLUX.1 [dev] is 24 GB in bf16, FLUX.2 [dev] 64 GB) are refused unless allow_large=True
(`--allow-large`), so a mistyped preset does not fill a disk.
"""

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from flux_core.conditioner import TEXT_ENCODER_FOLDERS
from flux_core.files import CheckpointError, dtype_named
from flux_core.flux2.conditioner import LAYOUT as FLUX2_TEXT_LAYOUT
from flux_core.flux2.conditioner import get_spec
from flux_core.inference import META_RESOLUTION, ae_metadata, flux_metadata
from flux_core.presets import MODEL_CLASSES, AnyPreset, get_preset

from .convert import check_writable, write_safetensors

WEIGHT_STD = 0.02
# Transformer dtypes offered (names of flux_core.files.DTYPES): float16 is not how FLUX.1 ships.
DTYPE_CHOICES = ("float32", "bfloat16")
# Presets up to this many transformer parameters also get random text encoders (the 12B ones would
# need a 4.7B T5: pointless for tests, and the real encoders are what one benchmarks with).
SMALL_PRESET_PARAMS = 100_000_000
# Checkpoint sets larger than this are written only when asked for explicitly (allow_large).
MAX_BYTES = 4 * 2**30


def tensor_seed(seed: int, key: str) -> int:
    """A generator seed for one tensor, stable across runs, platforms and key order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def is_norm_scale(key: str, shape: tuple[int, ...]) -> bool:
    """RMSNorm `.scale` (transformer), GroupNorm `.weight` (AE: the only 1-D weights) and the FLUX.2
    AE's BatchNorm `running_var` (which must stay positive)."""
    return key.endswith((".scale", "running_var")) or (key.endswith(".weight") and len(shape) == 1)


def random_tensor(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(tensor_seed(seed, key))
    t = torch.randn(shape, generator=g, dtype=torch.float32) * WEIGHT_STD
    if is_norm_scale(key, shape):
        t += 1.0
    return t.to(dtype)


def meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def integer_dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    """The state-dict entries that are not floating point (bn.num_batches_tracked), with their dtypes."""
    return {k: v.dtype for k, v in module.state_dict().items() if not v.is_floating_point()}


def write_random_file(
    path: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    dtype: torch.dtype,
    metadata: dict[str, str],
    force: bool = False,
    integers: dict[str, torch.dtype] | None = None,
) -> Path:
    """Random float tensors in `dtype`; the keys of `integers` as zeros of their own dtype."""
    integers = integers or {}
    keys = sorted(shapes)
    plan = [(k, shapes[k], integers.get(k, dtype)) for k in keys]

    def tensor(k: str) -> Tensor:
        return (
            torch.zeros(shapes[k], dtype=integers[k])
            if k in integers
            else random_tensor(k, shapes[k], seed, dtype)
        )

    tensors = ((k, tensor(k)) for k in keys)
    return write_safetensors(path, plan, tensors, metadata={"format": "pt", **metadata}, force=force)


@dataclass
class RandomCheckpoint:
    transformer: Path
    ae: Path | None = None
    text_encoders: Path | None = None
    text_folders: tuple[str, ...] = ()  # the folders written into text_encoders
    notes: list[str] = field(default_factory=list)


def transformer_filename(preset: AnyPreset, depth: int | None, depth_single: int | None) -> str:
    if preset.family == "flux1":
        name, prefix = preset.name.removeprefix("flux-"), "flux1"
    else:
        name, prefix = preset.name.removeprefix("flux2-").replace("-flux2", ""), "flux2"  # tiny-flux2-dev: tiny-dev
    if depth is not None or depth_single is not None:
        name += f"-d{preset.params.depth if depth is None else depth}"
        name += f"s{preset.params.depth_single_blocks if depth_single is None else depth_single}"
    return f"{prefix}-{name}.safetensors"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def write_random_checkpoint(
    preset: str,
    out: str | os.PathLike,
    seed: int = 0,
    dtype: str = "bfloat16",
    transformer_only: bool = False,
    depth: int | None = None,
    depth_single: int | None = None,
    force: bool = False,
    allow_large: bool = False,
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
    pruned = params != p.params
    flow_cls, ae_cls = MODEL_CLASSES[p.family]
    with torch.device("meta"):
        flow = flow_cls(params)
        ae = None if transformer_only else ae_cls(p.ae_params)
    flux_shapes = meta_shapes(flow)
    n_flow = sum(torch.Size(s).numel() for s in flux_shapes.values())
    n_ae = 0 if ae is None else sum(t.numel() for t in ae.state_dict().values())
    nbytes = n_flow * torch_dtype.itemsize + n_ae * 4
    if nbytes > MAX_BYTES and not allow_large:
        parts = f"transformer {_gb(n_flow * torch_dtype.itemsize)} in {dtype}"
        parts += "" if ae is None else f" + autoencoder {_gb(n_ae * 4)} in float32"
        raise CheckpointError(
            f"preset {p.name!r} would write {_gb(nbytes)} ({parts}), above the "
            f"{MAX_BYTES / 2**30:.0f} GiB limit; pass --allow-large to write it anyway, or fewer blocks with "
            "--depth / --depth-single"
        )
    flux_path = out / transformer_filename(p, depth, depth_single)
    ae_path = out / "ae.safetensors"
    small = n_flow <= SMALL_PRESET_PARAMS
    with_text = not transformer_only and small
    text_folders = TEXT_ENCODER_FOLDERS if p.family == "flux1" else tuple(FLUX2_TEXT_LAYOUT)
    # Check every target before writing anything, so a refusal leaves the folder as it was.
    check_writable(flux_path, force)
    if not transformer_only:
        check_writable(ae_path, force)
    if with_text and not force:
        for name in text_folders:
            if (out / name).exists():
                raise CheckpointError(f"{out / name} already exists; pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)

    metadata = flux_metadata(params, preset=None if pruned else p.name)
    if pruned:
        metadata["fluxspace.pruned_from"] = p.name
    result = RandomCheckpoint(write_random_file(flux_path, flux_shapes, seed, torch_dtype, metadata, force))
    if transformer_only:
        return result
    ae_meta = (
        ae_metadata(p.ae_params) if p.family == "flux1" else {META_RESOLUTION: str(p.ae_params.resolution)}
    )
    result.ae = write_random_file(
        ae_path, meta_shapes(ae), seed, torch.float32, ae_meta, force, integers=integer_dtypes(ae)
    )
    if with_text and p.family == "flux2":
        # A tiny random LLM in the preset's slot (klein: Qwen3, dev: Mistral3): context_in_dim = (layers
        # read) x its width.
        from .text_encoders import install_folders, write_random_mistral3, write_random_qwen3

        layers = get_spec(p.text_encoder).output_layers
        writer = write_random_qwen3 if p.text_encoder == "klein" else write_random_mistral3
        build = partial(writer, hidden=p.params.context_in_dim // len(layers), layers=max(layers), seed=seed)
        result.text_encoders = install_folders(out, text_folders, build, overwrite=force)
        result.text_folders = text_folders
    elif with_text:
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
        result.text_folders = text_folders
    else:
        result.notes.append(
            f"no text encoders for {p.name} (only for presets up to {SMALL_PRESET_PARAMS:,} parameters)"
        )
    return result
