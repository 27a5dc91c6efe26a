"""Weight files on disk: safetensors headers, dtype names, shard folders, and the files of one model.

Only headers are read (checked for truncation and corruption) until a model's tensors are asked
for, so a 24 GB file is opened and described in milliseconds. The loader (loading.py) and the
weight tools (weights_tools/: inspect, verify, convert) open files through `open_weights` alone.

A model's weights are one .safetensors file (official or diffusers layout, keys optionally
prefixed `model.diffusion_model.`), a folder of shards named by an index json, or one component
(transformer/ or vae/) of a diffusers pipeline folder. Keys are always module keys: the prefix is
removed on reading, and which layout, model and family (FLUX.1 or FLUX.2) the keys are is read from
the keys (formats.detect_format, formats.detect_family).
"""

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .flux2.formats import CONVERTERS as FLUX2_CONVERTERS
from .formats import CONVERTERS, detect_family, detect_format, strip_prefix

Shapes = dict[str, tuple[int, ...]]
# Each family's converters: (model, target layout) -> function (flux_core/formats.py, flux2/formats.py).
FAMILY_CONVERTERS = {"flux1": CONVERTERS, "flux2": FLUX2_CONVERTERS}


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
#
# Everything safetensors' own loader demands (safetensors/src/tensor.rs: `read_metadata`,
# `Metadata::validate`) is checked here, before any tensor is read, so a file that passes is one
# `safe_open` reads: the header a JSON object (strict JSON: no NaN, no lone surrogates, no key
# twice) of entries {dtype, shape, data_offsets}; the tensors, sorted by offsets, cover the data
# section exactly, each with numel x dtype size bytes; `__metadata__` absent, null or str -> str.

# safetensors refuses a header longer than this (tensor.rs, MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# Shapes whose element count (ignoring zeros) reaches this overflow torch's int64 strides.
MAX_ELEMENTS = 2**63
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


def _json_type(value) -> str:
    """The JSON name of a parsed value's type with its article, for messages: 'an integer'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), "a value")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(value) -> bool:
    """A JSON non-negative integer (not a boolean, not 2.0)."""
    return type(value) is int and value >= 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one JSON object")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse_int(text: str) -> int | float:
    # serde_json reads -0 as the float -0.0 (not a usize): keep it a float so that it is refused too.
    return -0.0 if text == "-0" else int(text)


def _parse_header(path: Path, raw: bytes) -> dict:
    """The header's JSON object, parsed as strictly as safetensors' serde_json parses it."""
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_int=_parse_int)
        # A lone surrogate (\ud800) parses in Python but not in serde_json; it cannot be encoded.
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            f"{path} has a corrupt safetensors header: a string holds a lone surrogate escape (\\ud800-\\udfff), "
            "which is not valid UTF-8"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{path} has a corrupt safetensors header: JSON nested too deeply") from None
    except (ValueError, UnicodeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} has a corrupt safetensors header: {' '.join(str(e).split())}") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} has a corrupt safetensors header: {_json_type(header)}, expected an object"
        )
    return header


def _check_metadata(path: Path, metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{path}: the header's __metadata__ is {_json_type(metadata)}; expected an object of string -> string"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(
                f"{path}: __metadata__ {key!r} is {_json_type(value)} ({_short(value)}); "
                "expected a string (safetensors metadata is string -> string)"
            )
    return metadata


def _check_entry(path: Path, key: str, info) -> tuple[tuple[int, ...], str, int, int]:
    """(shape, dtype, begin, end) of one header entry, each checked."""
    what = f"{path}: header entry {key!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{what} is {_json_type(info)}; expected an object with dtype, shape, data_offsets")
    absent = [name for name in _ENTRY_FIELDS if name not in info]
    if absent:
        raise CheckpointError(f"{what} has no {', '.join(absent)}; every tensor needs dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{what} has dtype {_short(dtype)}; valid: {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"{what} has shape {_short(shape)}; expected a list of non-negative integers")
    if math.prod(max(s, 1) for s in shape) >= MAX_ELEMENTS:
        raise CheckpointError(f"{what} has shape {_short(shape)}: too large for any tensor (2**63 elements or more)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(
            f"{what} has data_offsets {_short(offsets)}; expected [begin, end], two non-negative integers"
        )
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{what} has data_offsets [{begin}, {end}]: begin after end; expected begin <= end")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{what} is {dtype} {tuple(shape)}, {nbytes} bytes, but its data_offsets [{begin}, {end}] "
            f"hold {end - begin} bytes; dtype, shape and offsets must agree"
        )
    return tuple(shape), dtype, begin, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_start: int, size: int) -> None:
    """The tensors, sorted by offsets (as safetensors sorts them), cover the data section exactly."""
    covered = 0
    previous = None
    for begin, end, key in sorted(spans, key=lambda s: (s[0], s[1])):
        if begin < covered:
            raise CheckpointError(
                f"{path}: the data of {key!r} [{begin}, {end}] overlaps that of {previous!r} (up to {covered}); "
                "each tensor needs its own bytes"
            )
        if begin > covered:
            after = f"after {previous!r}" if previous is not None else "at the start of the data"
            raise CheckpointError(
                f"{path}: the bytes [{covered}, {begin}) {after} belong to no tensor; "
                "safetensors needs the tensors to cover the data section without gaps"
            )
        covered, previous = end, key
    if data_start + covered > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {data_start + covered} bytes but the file has {size}; "
            "download or copy it again"
        )
    if data_start + covered < size:
        raise CheckpointError(
            f"{path} has {size - data_start - covered} bytes after the last tensor's data (the header describes "
            f"{data_start + covered} bytes, the file has {size}); safetensors needs the data to end the file"
        )


def read_header(path: str | os.PathLike) -> tuple[Shapes, dict[str, str], dict[str, str]]:
    """Shapes, dtypes and metadata of a .safetensors file, checked as safetensors checks it (see above)."""
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
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path} has a header of {n} bytes; safetensors reads at most {MAX_HEADER_BYTES:,}"
            )
        header = _parse_header(path, f.read(n))
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    shapes, dtypes, spans = {}, {}, []
    for key, info in header.items():
        shapes[key], dtypes[key], begin, end = _check_entry(path, key, info)
        spans.append((begin, end, key))
    _check_layout(path, spans, 8 + n, size)
    return shapes, dtypes, metadata


# ----------------------------------------------------------------------------------------------
# Folders

# diffusers pipeline subfolders of our two models (FLUX.1-dev: transformer/, vae/).
COMPONENT_FOLDERS = {"transformer": "transformer", "ae": "vae"}


def shard_files(folder: Path) -> list[Path]:
    """The .safetensors files of one folder: the shards an index json names, else every file."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        return [folder / name for name in sorted(set(read_index(index[0]).values()))]
    return sorted(folder.glob("*.safetensors"))


def read_index(path: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index json (tensor key -> shard file name), checked."""
    try:
        index = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise CheckpointError(f"{path} is not a valid safetensors index: JSON nested too deeply") from None
    except (ValueError, UnicodeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors index: {' '.join(str(e).split())}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        if not isinstance(index, dict):
            found = f"{_json_type(index)}"
        else:
            found = "no weight_map" if weight_map is None else f"weight_map is {_json_type(weight_map)}"
        raise CheckpointError(
            f"{path} is not a valid safetensors index: {found}; expected an object with a "
            '"weight_map" object of tensor key -> shard file name'
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(
                f"{path}: weight_map[{key!r}] is {_short(name)}; expected the name of a shard file in {path.parent}"
            )
    return weight_map


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


INTEGER_BUFFER = "num_batches_tracked"  # BatchNorm's step counter: the one tensor kept as integers


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

    @property
    def family(self) -> str | None:
        """'flux1' or 'flux2' (formats.detect_family); None if the keys are of neither model."""
        return detect_family(self.shapes)

    def converter(self, to: str) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        """The function converting this model's tensors to the layout `to` ('bfl' or 'diffusers')."""
        return FAMILY_CONVERTERS[self.family][(self.format[1], to)]

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
        """Every tensor, read memory-mapped one at a time into `dtype` on `device`, under official names.

        The one integer buffer (the FLUX.2 autoencoder's bn.num_batches_tracked) keeps its dtype; any
        other tensor stored as integers is cast like the rest."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key, (file, file_key) in self.where.items():
            by_file.setdefault(file, []).append((key, file_key))
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key, file_key in keys:
                    t = f.get_tensor(file_key)
                    counter = key.endswith(INTEGER_BUFFER) and not t.is_floating_point()
                    out[key] = t.to(device=device, dtype=t.dtype if counter else dtype)
        return out if self._is_bfl() else self._to_bfl(out)

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], Tensor]]:
        """While open: a function from module key to that tensor as stored, read memory-mapped on the
        CPU one call at a time (runtime/fp8.py reads fp8 files through it)."""
        with ExitStack() as stack:
            opened = {file: stack.enter_context(safe_open(file, framework="pt", device="cpu")) for file in self.files}
            yield lambda key: opened[self.where[key][0]].get_tensor(self.where[key][1])

    def _is_bfl(self) -> bool:
        # Keys of no known model are left as they are: the caller's check names what is wrong.
        return self.format is None or self.format[0] == "bfl"

    def _to_bfl(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.converter("bfl")(tensors)


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
