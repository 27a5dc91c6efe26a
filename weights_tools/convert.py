"""Convert weight files between the official BFL layout and diffusers', and write safetensors files.

The rename tables and the lists of fused tensors live in flux_core/formats.py (FLUX.1) and
flux_core/flux2/formats.py (FLUX.2; the family is read from the keys); the loaders convert diffusers
folders on load with the same functions. This file adds the file handling:

- `write_safetensors` streams tensors into a file whose header is planned up front, so writing a
  24 GB model holds one tensor in memory at a time. It writes a temporary file in the target folder
  and renames it into place (flux_core.atomic.atomic_file): a failure never leaves a half-written
  file, and an existing file is replaced only with force=True.
- `convert_file` converts block by block: the conversion of each transformer block only needs that
  block's tensors, so the plan is made on meta tensors first and the data then flows one block at
  a time (the autoencoder, 335 MB, is one group).
- `--to fp8` writes a scaled fp8 file in the official layout (flux_core/runtime/fp8.py): the
  blocks' Linear weights as F8_E4M3 plus a float32 `<module>.scale_weight` each, the rest as stored;
  quantized block by block too, so a 24 GB bf16 file needs one block of memory.
"""

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from flux_core.atomic import atomic_file
from flux_core.files import TORCH_TO_SAFETENSORS, CheckpointError, WeightFiles, open_weights
from flux_core.runtime import fp8

from .inspect import require_format

# One planned tensor: name, shape, dtype, in the order the data will be written.
Plan = list[tuple[str, tuple[int, ...], torch.dtype]]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to replace an existing file without force; create the parent folder."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the path of the .safetensors file to write")
    if path.exists() and not force:
        raise CheckpointError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_safetensors(
    path: str | os.PathLike,
    plan: Plan,
    tensors: Iterable[tuple[str, Tensor]],
    metadata: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write `tensors` (yielded in `plan` order, names/shapes/dtypes as planned) to a safetensors file."""
    path = check_writable(path, force)
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for name, shape, dtype in plan:
        if dtype not in TORCH_TO_SAFETENSORS:
            raise CheckpointError(f"cannot write {name}: dtype {dtype} has no safetensors name")
        size = _nbytes(shape, dtype)
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if len(header) != len(plan) + 1:
        raise CheckpointError("the plan names a tensor twice")
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_file(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        produced = iter(tensors)
        for name, shape, dtype in plan:
            got_name, t = next(produced, (None, None))
            if got_name != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                got = "nothing" if got_name is None else f"{got_name} {tuple(t.shape)} {t.dtype}"
                raise AssertionError(f"planned {name} {tuple(shape)} {dtype}, got {got}")
            # (N,) uint8 view of the bytes; numpy exposes it to write() without a copy.
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        assert next(produced, None) is None, "more tensors than planned"
    return path


# ----------------------------------------------------------------------------------------------
# Conversion

# Transformer keys convert one block at a time; everything outside the blocks is one more group.
_BLOCK = re.compile(r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.\d+\.")


def _groups(ws: WeightFiles, model: str) -> list[list[str]]:
    """Sets of keys that convert on their own: one per block and one per module outside the blocks."""
    if model == "ae":  # the up-block reversal needs every decoder key at once; 335 MB is fine
        return [list(ws.shapes)]
    groups: dict[str, list[str]] = {}
    for key in ws.shapes:
        m = _BLOCK.match(key)
        groups.setdefault(m.group(0) if m else key.rsplit(".", 1)[0], []).append(key)
    return list(groups.values())


@dataclass
class ConvertResult:
    path: Path
    model: str
    source_layout: str
    target_layout: str
    num_in: int
    num_out: int


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    model: str | None = None,
    force: bool = False,
) -> ConvertResult:
    """Convert a file (or a diffusers folder) to `to` ('diffusers' or 'bfl'), one file out, dtypes kept;
    or to 'fp8': a scaled fp8 transformer file in the official layout (see the module docstring).

    model ('transformer' or 'ae') is detected from the keys; passing it checks the detection and
    picks the component of a diffusers pipeline folder.
    """
    if to not in TARGETS:
        raise CheckpointError(f"unknown target {to!r}; valid: {', '.join(TARGETS)}")
    if model is not None and model not in ("transformer", "ae"):
        raise CheckpointError(f"unknown model {model!r}; valid: transformer, ae")
    ws = open_weights(src, model)
    layout, found = require_format(ws, src, model)
    if to == "fp8":
        convert = _fp8_converter(ws, src, layout, found)
    elif layout == to:
        raise CheckpointError(f"{src} is already in the {to} layout")
    else:
        convert: Callable = ws.converter(to)  # FLUX.1's or FLUX.2's tables, by the keys
    check_writable(dst, force)

    # Plan on meta tensors (this also validates every key before a byte is written). Each group's
    # output keys are a contiguous run of the sorted key list, so writing groups in the order of
    # their first output key gives a file sorted by key, byte-identical to one written in one go.
    converted = [(keys, convert(ws.meta_tensors(keys))) for keys in _groups(ws, found)]
    converted.sort(key=lambda group: min(group[1]))
    groups = [keys for keys, _ in converted]
    plan: Plan = [(k, tuple(out[k].shape), out[k].dtype) for _, out in converted for k in sorted(out)]
    assert [k for k, _, _ in plan] == sorted(k for k, _, _ in plan)

    def produce(files: dict[Path, object]) -> Iterator[tuple[str, Tensor]]:
        for keys in groups:
            out = convert({k: files[ws.where[k][0]].get_tensor(ws.where[k][1]) for k in keys})
            yield from sorted(out.items())

    with ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(f, framework="pt", device="cpu")) for f in ws.files}
        path = write_safetensors(dst, plan, produce(files), metadata=ws.metadata, force=force)
    return ConvertResult(path, found, layout, to, len(ws.shapes), len(plan))


TARGETS = ("diffusers", "bfl", "fp8")


def _fp8_converter(ws: WeightFiles, src, layout: str, found: str) -> Callable:
    """The group converter of `--to fp8`: to the official layout if needed, then quantized."""
    if found != "transformer":
        raise CheckpointError(f"{src} holds an autoencoder; --to fp8 converts a Flux transformer")
    if fp8.fp8_layout(ws).scales:
        raise CheckpointError(f"{src} is already a scaled fp8 file")
    if layout == "bfl":
        return fp8.quantize_state_dict
    to_bfl = ws.converter("bfl")
    return lambda tensors: fp8.quantize_state_dict(to_bfl(tensors))
