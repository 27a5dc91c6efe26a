"""Weight files on disk: safetensors headers, dtype names, shard folders, and the files of one model.

Only headers are read (checked for truncation and corruption) until a model's tensors are asked
for, so a 24 GB file is opened and described in milliseconds. The loader (loading.py) and the
weight tools (weights_tools/: inspect, verify, convert) open files through `open_weights` alone.

A model's weights are one .safetensors file (official or diffusers layout, keys optionally
prefixed `model.diffusion_model.`), a folder of shards named by an index json, or one component
(transformer/ or vae/) of a diffusers pipeline folder. Keys are always module keys: the prefix is
removed on reading, and which layout the keys use is read from the keys (formats.detect_format).
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .formats import CONVERTERS, detect_format, strip_prefix

Shapes = dict[str, tuple[int, ...]]


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked; the message says why and what is valid."""


# ----------------------------------------------------------------------------------------------
# Dtype names

# safetensors' dtype names (the "dtype" of each entry of a file's header) -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# The dtypes a model is loaded, run or written in, by the names users give (--dtype bfloat16).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str, valid: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype of a user-facing name; `valid` narrows DTYPES for a tool that takes fewer."""
    if name not in valid:
        raise CheckpointError(f"unknown dtype {name!r}; valid: {', '.join(valid)}")
    return DTYPES[name]


def header_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors header dtype name (BF16 -> torch.bfloat16)."""
    if name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"unsupported tensor dtype {name!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
    return SAFETENSORS_DTYPES[name]


# ----------------------------------------------------------------------------------------------
# One file's header


def read_header(path: str | os.PathLike) -> tuple[Shapes, dict[str, str], dict[str, str]]:
    """Shapes, dtypes and metadata of a .safetensors file, checked for truncation and corruption."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such weight file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > size - 8:
            raise CheckpointError(
                f"{path} is not a valid safetensors file (header length {n} for a file of {size} bytes): "
                "corrupt or not a .safetensors file"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes, end = {}, {}, 0
    for key, info in header.items():
        try:
            shapes[key] = tuple(int(s) for s in info["shape"])
            dtypes[key] = str(info["dtype"])
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{path} has a corrupt safetensors header entry for {key!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}; "
            "download or copy it again"
        )
    return shapes, dtypes, metadata


# ----------------------------------------------------------------------------------------------
# Folders

# diffusers pipeline subfolders of our two models (FLUX.1-dev: transformer/, vae/).
COMPONENT_FOLDERS = {"transformer": "transformer", "ae": "vae"}


def shard_files(folder: Path) -> list[Path]:
    """The .safetensors files of one folder: the shards an index json names, else every file."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index[0]} is not a valid safetensors index (needs a weight_map): {e}"
            ) from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def component_folders(path: Path) -> dict[str, Path]:
    """For a diffusers pipeline folder: {'transformer': path/transformer, 'ae': path/vae} as present."""
    return {model: path / sub for model, sub in COMPONENT_FOLDERS.items() if shard_files(path / sub)}


def _folder_files(path: Path, model: str | None) -> list[Path]:
    """The files of one model in a folder: its component subfolder if `model` names one that exists
    (the root of the FLUX.1-dev repository also holds the single files of both models), else the
    folder's own files, else those of its only component folder."""
    if model is not None and (path / COMPONENT_FOLDERS[model]).is_dir():
        folder = path / COMPONENT_FOLDERS[model]
        files = shard_files(folder)
        if not files:
            raise CheckpointError(
                f"{folder} holds no .safetensors file (expected diffusion_pytorch_model.safetensors)"
            )
        return files
    files = shard_files(path)
    if files:
        return files
    if model is not None:
        raise CheckpointError(f"{path} has no {COMPONENT_FOLDERS[model]}/ folder with .safetensors files")
    components = component_folders(path)
    if not components:
        raise CheckpointError(f"{path} holds no .safetensors file, and no transformer/ or vae/ folder that does")
    if len(components) > 1:
        raise CheckpointError(
            f"{path} holds both transformer/ and vae/: choose one with --model transformer or --model ae"
        )
    (folder,) = components.values()
    return shard_files(folder)


# ----------------------------------------------------------------------------------------------
# The files of one model


@dataclass
class WeightFiles:
    """The headers of one model's files: one file or the shards of one folder (no tensor read yet).

    `shapes`/`dtypes` are keyed by module key (the `model.diffusion_model.` prefix removed);
    `where` maps each module key to (file, key in that file).
    """

    path: Path
    files: list[Path]
    shapes: Shapes = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    where: dict[str, tuple[Path, str]] = field(default_factory=dict)
    prefixed: bool = False

    @property
    def format(self) -> tuple[str, str] | None:
        """(layout, model), e.g. ('diffusers', 'ae'); None if the keys are of neither model."""
        return detect_format(self.shapes)

    def meta_tensors(self, keys=None) -> dict[str, Tensor]:
        """Shape-and-dtype-only tensors (no memory), to run the converters on."""
        keys = self.shapes if keys is None else keys
        return {k: torch.empty(self.shapes[k], dtype=header_dtype(self.dtypes[k]), device="meta") for k in keys}

    def bfl_shapes(self) -> Shapes:
        """Shapes under official key names, converting diffusers keys on meta tensors. Raises ConversionError."""
        if self._is_bfl():
            return dict(self.shapes)
        return {k: tuple(v.shape) for k, v in self._to_bfl(self.meta_tensors()).items()}

    def bfl_tensors(self, device: str | torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """Every tensor, read memory-mapped one at a time into `dtype` on `device`, under official names."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key, (file, file_key) in self.where.items():
            by_file.setdefault(file, []).append((key, file_key))
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key, file_key in keys:
                    out[key] = f.get_tensor(file_key).to(device=device, dtype=dtype)
        return out if self._is_bfl() else self._to_bfl(out)

    def _is_bfl(self) -> bool:
        # Keys of no known model are left as they are: the caller's check names what is wrong.
        return self.format is None or self.format[0] == "bfl"

    def _to_bfl(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return CONVERTERS[(self.format[1], "bfl")](tensors)


def open_weights(path: str | os.PathLike, model: str | None = None) -> WeightFiles:
    """Read the headers of a .safetensors file, a folder of shards, or one component of a pipeline folder.

    model ('transformer' or 'ae') picks the component of a diffusers pipeline folder; it is needed
    only when the folder holds both.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _folder_files(path, model)
    else:
        raise CheckpointError(f"no such weight file or folder: {path}")
    wf = WeightFiles(path=path, files=files)
    for file in files:
        shapes, dtypes, metadata = read_header(file)
        wf.metadata.update(metadata)
        for file_key, shape in shapes.items():
            key = strip_prefix(file_key)
            wf.prefixed |= key != file_key
            if key in wf.shapes:
                raise CheckpointError(f"{path}: key {key!r} appears twice (in {wf.where[key][0]} and {file})")
            wf.shapes[key], wf.dtypes[key], wf.where[key] = shape, dtypes[file_key], (file, file_key)
    return wf
