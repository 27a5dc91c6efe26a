"""What every output PNG records: the settings that made it, and which code and weights made it.

    command, prompt, seed, width, height, steps, guidance, cfg_scale, negative_prompt, parity,
    preset, model, dtype, weights_format, device, offload, text_device, staged, compile, version, weights

`weights_format` is how the transformer held its weights: "full" (in `dtype`) or "fp8" (its block
Linears as float8 e4m3fn with a per-tensor scale, computed in `dtype`). `weights` names each weight file (transformer, autoencoder, text encoders) with its size and the
SHA-256 of its safetensors header: the header lists every tensor's name, shape, dtype and offsets,
so two files with the same header hash hold the same layout, and hashing it costs microseconds
where hashing a 24 GB file costs minutes.
"""

import hashlib
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from flux_core.conditioner import TEXT_ENCODER_FOLDERS
from flux_core.files import open_weights

from .models import FluxModels, ModelPaths
from .settings import SampleSettings


def package_version() -> str:
    try:
        return version("fluxspace")
    except PackageNotFoundError:
        return "unknown"


def header_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a safetensors file's header (its 8-byte length and the JSON)."""
    with open(path, "rb") as f:
        head = f.read(8)
        return hashlib.sha256(head + f.read(int.from_bytes(head, "little"))).hexdigest()


def weight_files(paths: ModelPaths) -> list[dict]:
    """Every weight file of the model: name (relative to its part's folder), size, header hash."""
    parts = [(part, Path(path), open_weights(path, part).files) for part, path in
             (("transformer", paths.transformer), ("ae", paths.ae))]  # fmt: skip
    for folder in TEXT_ENCODER_FOLDERS[:2]:  # the two models; the tokenizers hold no weights
        path = Path(paths.text_encoders) / folder
        parts.append((folder, path, sorted(path.glob("*.safetensors"))))
    out = []
    for part, path, files in parts:
        for file in files:
            name = file.name if path.is_file() else str(Path(file).relative_to(path))
            out.append({"part": part, "file": name, "bytes": file.stat().st_size, "header_sha256": header_sha256(file)})
    return out


def run_metadata(command: str, models: FluxModels, settings: SampleSettings, **fields) -> dict:
    """The metadata of one output image: the command's own fields, the settings, model, code and weights."""
    s = settings
    return {
        "command": command, **fields, "width": s.width, "height": s.height, "steps": s.steps, "guidance": s.guidance,
        "cfg_scale": s.cfg_scale, "negative_prompt": s.negative_prompt, "parity": s.parity,
        "preset": models.preset.name, "model": str(models.paths.transformer),
        "dtype": str(models.dtype).removeprefix("torch."), "weights_format": models.weights,
        "device": str(models.device), **models.residency.summary(), "compile": models.compiled,
        "version": package_version(), "weights": weight_files(models.paths),
        "loras": models.loras.summary(), "lora_mode": models.loras.mode,
    }  # fmt: skip
