"""A LoRA file: read, checked key by key, and turned into one low-rank update per target Linear.

Strict by design (the FLUX trackers are full of LoRAs whose keys were silently skipped): every key
of the file is one of an entry's tensors, every entry names a module this model has, with shapes
that fit it, finite values and, in the kohya format, its alpha; otherwise `LoraError` says which
keys and why, before a model runs.

How an entry becomes an update (apply.py's LowRank, delta W = up @ down):
- strength alpha / r is folded into `up` (r = the entry's rank, `down`'s rows); without an alpha
  (diffusers without `.alpha`, bfl, xlabs) it is 1, as diffusers and the official code apply them;
- an entry on a part of a fused official Linear (diffusers' to_q of img_attn.qkv) places its `up`
  in that part's rows; all entries on one Linear are stacked into one update: the downs one under
  the other, the ups side by side in their rows (a block matrix, exact: the blocks off an entry's
  rows are zeros).

Letters: R rank, I in features, O out features.
"""

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..files import CheckpointError, read_header
from .apply import LowRank
from .formats import FAMILIES, FLUX1, FLUX2, PARTS, Entry, Family, Rows, detect, get_family, parse

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# Known model families by a key that only their LoRAs carry: named in the refusal of a foreign file.
FOREIGN_MODELS = {
    "lora_unet_down_blocks_": "Stable Diffusion (1.x / 2.x / XL)",
    "lora_unet_input_blocks_": "Stable Diffusion (1.x / 2.x / XL, original layout)",
    "lora_unet_joint_blocks_": "Stable Diffusion 3",
    "joint_blocks.": "Stable Diffusion 3",
    "down_blocks.": "Stable Diffusion (diffusers layout)",
    ".attn2.": "Stable Diffusion 3.5 / a UNet (cross-attention modules FLUX.1 lacks)",
    "pos_embed.": "Stable Diffusion 3",
    "lora_te2_": "Stable Diffusion XL (second CLIP encoder)",
}


FLUX2_MARKER = "single_stream_modulation.lin"  # a Linear of every FLUX.2 transformer, of no FLUX.1 one


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model; the message says which keys and why."""


class ForeignLoraError(LoraError):
    """A LoRA file whose format or module names are not the family's (another family's, or another model's)."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Piece:
    """One entry's tensors, read and checked: up already times alpha / r."""

    entry: Entry
    down: Tensor  # (R, I)
    up: Tensor  # (O_part, R), scaled
    bias: Tensor | None  # (O_part,), scaled
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and checked on its own (no model needed): its format and pieces."""

    path: Path
    format: str
    pieces: tuple[Piece, ...]
    metadata: dict[str, str]
    family: Family = FLUX1  # the model family whose module names the file was read against

    @property
    def parts(self) -> tuple[str, ...]:
        """The model parts it updates, in run order: "clip", "t5", "flow"."""
        return tuple(p for p in PARTS if any(x.entry.target.part == p for x in self.pieces))

    def ranks(self) -> list[int]:
        return sorted({p.rank for p in self.pieces})

    def alphas(self) -> list[float]:
        return sorted({p.alpha for p in self.pieces if p.alpha is not None})

    def targets(self, part: str) -> list[str]:
        return sorted({p.entry.target.module for p in self.pieces if p.entry.target.part == part})


def _listing(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _foreign(keys) -> str | None:
    for marker, model in FOREIGN_MODELS.items():
        if any(marker in k for k in keys):
            return model
    return None


def read_lora(path: str | os.PathLike, family: str | Family = "flux1") -> LoraFile:
    """Read a LoRA .safetensors file for a model of `family` ("flux1" or "flux2", formats.FAMILIES) and
    check it on its own: format, keys, ranks, alphas, values."""
    path = Path(path)
    family = get_family(family)
    shapes, dtypes, metadata = read_header(path)
    fmt = detect(shapes, family)
    if fmt is None:
        foreign = _foreign(shapes)
        what = f"a {foreign} LoRA" if foreign else "not a LoRA file"
        raise LoraError(
            f"{path}: {what}: no key has a LoRA suffix (found {_listing(shapes, 4)}); known formats: "
            f"{', '.join(family.formats)} (keys ending .lora_A.weight / .lora_B.weight, .lora_down.weight / "
            ".lora_up.weight + .alpha" + (", or XLabs .processor.*.down.weight / .up.weight)" if "xlabs" in family.formats else ")")
        )
    if fmt not in family.formats:
        raise ForeignLoraError(f"{path}: a {fmt} LoRA; {family.name} LoRA files are read in the {', '.join(family.formats)} "
                        f"formats only ({fmt} files exist for FLUX.1)")  # fmt: skip
    entries, left = parse(shapes, fmt, family)
    unknown = [e.name for e in entries if e.target is None]
    if unknown:
        foreign = _foreign(unknown)
        hint = f" (these are {foreign} module names)" if foreign else ""
        scope = "and of CLIP / T5" if family.text_encoders else "only (text-encoder LoRAs are not supported)"
        raise ForeignLoraError(
            f"{path}: {fmt} LoRA for modules {family.name} does not have{hint}: {_listing(unknown)}; "
            f"a {family.name} LoRA updates the Linears of the transformer (official or diffusers names) {scope}"
        )
    if left:
        raise LoraError(
            f"{path}: {len(left)} key(s) of this {fmt} LoRA are no LoRA tensor and would be left unused: "
            f"{_listing(left)}; refusing rather than dropping them silently (full replacement tensors, e.g. "
            "the RMSNorm scales of a control LoRA, are not applied)"
        )
    dora = [e.dora for e in entries if e.dora is not None]
    if dora:
        raise LoraError(f"{path}: DoRA magnitude tensors ({_listing(dora)}) are not supported; only plain LoRA is")
    for role in ("down", "up"):
        missing = [e.name for e in entries if getattr(e, role) is None]
        if missing:
            raise LoraError(f"{path}: LoRA entries without their {role} matrix: {_listing(missing)}")
    if fmt == "kohya":
        missing = [e.name for e in entries if e.alpha is None]
        if missing:
            raise LoraError(f"{path}: kohya LoRA entries without .alpha: {_listing(missing)}; sd-scripts writes "
                            "one per module, so the file is incomplete (its strength alpha / rank is unknown)")  # fmt: skip
    bad = [k for k in shapes if dtypes[k] not in FLOAT_DTYPES]
    if bad:
        raise LoraError(f"{path}: LoRA tensors must be float ({', '.join(FLOAT_DTYPES)}); "
                        f"{bad[0]} is {dtypes[bad[0]]}")  # fmt: skip
    alpha_default = _metadata_alpha(path, metadata) if fmt == "diffusers" else None
    with safe_open(path, framework="pt") as f:
        pieces = tuple(_piece(path, f, e, shapes, alpha_default) for e in entries)
    return LoraFile(path, fmt, pieces, metadata, family)


def _proportion(out_features: int, in_features: int, ratio: Fraction) -> bool:
    return out_features * ratio.denominator == ratio.numerator * in_features


def mlp_families(piece: "Piece") -> list[str]:
    """Names of the families whose official MLP proportions a whole-module update has (FLUX.1 and FLUX.2
    share their official module names; the MLPs' shapes tell them apart). Every family for an update
    of anything else (attention, modulation, a part of a fused Linear). A model of another MLP ratio,
    as flux-mini's training code can build, fits neither: this is a hint, never a refusal."""
    target = piece.entry.target
    out_features, in_features = piece.up.shape[0], piece.down.shape[1]
    fits = []
    for family in FAMILIES.values():
        ratios = [r for suffix, r in family.mlp_proportions().items() if target.module.endswith(suffix)]
        if target.part != "flow" or target.rows is not None or not ratios or _proportion(out_features, in_features, ratios[0]):
            fits.append(family.name)
    return fits


def _metadata_alpha(path: Path, metadata: dict[str, str]) -> float | None:
    """lora_alpha from diffusers' `lora_adapter_metadata` (its LoRA saves since 0.35), if it is there."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(f"{path}: its lora_adapter_metadata is not JSON") from None
    config = {k.removeprefix("transformer."): v for k, v in config.items()} if isinstance(config, dict) else {}
    for field in ("alpha_pattern", "rank_pattern"):
        if config.get(field):
            raise LoraError(f"{path}: lora_adapter_metadata sets {field}, which is not supported (one lora_alpha is)")
    alpha = config.get("lora_alpha")
    return None if alpha is None else _finite(path, "lora_adapter_metadata lora_alpha", alpha)


def _finite(path: Path, what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LoraError(f"{path}: {what} is {value!r}; it must be a finite number")
    return float(value)


def _piece(path: Path, f, e: Entry, shapes, alpha_default: float | None) -> Piece:
    down_shape, up_shape = shapes[e.down], shapes[e.up]
    if len(down_shape) != 2 or len(up_shape) != 2:
        raise LoraError(f"{path}: {e.name}: down {down_shape} and up {up_shape} must both be matrices")
    if 0 in down_shape or 0 in up_shape:
        raise LoraError(f"{path}: {e.name}: down {down_shape} and up {up_shape} are empty (rank or width 0)")
    if up_shape[1] != down_shape[0]:
        raise LoraError(
            f"{path}: {e.name}: rank mismatch: down {e.down} has rank {down_shape[0]} (rows) but up {e.up} "
            f"has rank {up_shape[1]} (columns)"
        )
    if e.bias is not None and shapes[e.bias] != (up_shape[0],):
        raise LoraError(f"{path}: {e.bias} has shape {shapes[e.bias]}; it should be ({up_shape[0]},), one per up row")
    tensors = {}
    for key in (e.down, e.up, e.bias, e.alpha):
        if key is None:
            continue
        t = f.get_tensor(key).float()
        if not torch.isfinite(t).all():
            raise LoraError(f"{path}: {key} holds NaN or inf values")
        tensors[key] = t
    alpha = alpha_default
    if e.alpha is not None:
        if tensors[e.alpha].numel() != 1:
            raise LoraError(f"{path}: {e.alpha} has shape {shapes[e.alpha]}; an alpha is one number")
        alpha = tensors[e.alpha].item()
    scale = 1.0 if alpha is None else alpha / down_shape[0]
    bias = tensors[e.bias] * scale if e.bias is not None else None
    return Piece(e, tensors[e.down], tensors[e.up] * scale, bias, alpha)


# ----------------------------------------------------------------------------------------------
# Against a model


def _row_spans(rows: Rows, out_features: int, in_features: int) -> list[tuple[int, int]]:
    """The output-row spans (start, stop) of `rows` in a target of this shape, in the entry's order."""
    sizes = [in_features] * (rows.of - 1) + [out_features - in_features * (rows.of - 1)]
    if rows.swap:  # two halves: diffusers' [scale | shift] is the official [shift | scale]
        sizes = [out_features // 2] * 2
    starts = [sum(sizes[:k]) for k in range(rows.of)]
    spans = [(starts[k], starts[k] + sizes[k]) for k in rows.parts]
    return spans[::-1] if rows.swap else spans


def updates_for(lora: LoraFile, part: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, LowRank]:
    """The updates of `lora` on one model part, checked against that part's Linear shapes.

    shapes: module name -> weight shape (O, I) of every Linear of the part. The transformer's family is
    told by its shared modulation (FLUX.2 has `single_stream_modulation.lin`; FLUX.1 a modulation per
    block): a file read for the other family is refused, not matched on the names the two share.
    """
    if part == "flow":
        model = FLUX2 if FLUX2_MARKER in shapes else FLUX1
        if model is not lora.family:
            raise LoraError(f"{lora.path}: read as a {lora.family.name} LoRA but the model is {model.name}: read it "
                            f"with read_lora(path, family={'flux2' if model is FLUX2 else 'flux1'!r})")  # fmt: skip
    pieces: dict[str, list[tuple[Piece, list[tuple[int, int]]]]] = {}
    for p in lora.pieces:
        target = p.entry.target
        if target.part != part:
            continue
        shape = shapes.get(target.module)
        if shape is None:
            raise LoraError(f"{lora.path}: {p.entry.name} updates {target.module}, which this model does not have")
        out_features, in_features = shape
        if p.down.shape[1] != in_features:
            raise LoraError(
                f"{lora.path}: {p.entry.down} takes {p.down.shape[1]} input features{_other_family(p, lora)}; "
                f"{target.module} of this model takes {in_features} (a LoRA for a model of another width, or with "
                "extra input channels)"
            )
        spans = [(0, out_features)] if target.rows is None else _row_spans(target.rows, out_features, in_features)
        rows = sum(b - a for a, b in spans)
        if p.up.shape[0] != rows:
            raise LoraError(f"{lora.path}: {p.entry.up} has {p.up.shape[0]} rows{_other_family(p, lora)}; it updates {rows} rows of "
                            f"{target.module} ({out_features} in all)")  # fmt: skip
        pieces.setdefault(target.module, []).append((p, spans))
    return {module: _stack(lora, module, shapes[module], group) for module, group in pieces.items()}


def _other_family(piece: Piece, lora: LoraFile) -> str:
    """A refusal's hint: the piece has the MLP proportions of the other family's official models only."""
    fits = mlp_families(piece)
    return f" (a {fits[0]} MLP's proportions: a {fits[0]} LoRA)" if len(fits) == 1 and fits[0] != lora.family.name else ""


def _stack(lora: LoraFile, module: str, shape, group) -> LowRank:
    """All pieces on one Linear as one LowRank: downs stacked, ups placed in their rows."""
    out_features = shape[0]
    covered = torch.zeros(out_features, dtype=torch.bool)
    rank = sum(p.rank for p, _ in group)
    down = torch.cat([p.down for p, _ in group])  # (R, I)
    up = torch.zeros(out_features, rank)  # (O, R)
    bias = None
    col = 0
    for p, spans in group:
        row = 0
        for a, b in spans:
            if covered[a:b].any():
                raise LoraError(f"{lora.path}: {p.entry.name} updates rows of {module} that another entry updates too")
            covered[a:b] = True
            up[a:b, col : col + p.rank] = p.up[row : row + b - a]
            if p.bias is not None:
                bias = torch.zeros(out_features) if bias is None else bias
                bias[a:b] = p.bias[row : row + b - a]
            row += b - a
        col += p.rank
    return LowRank(down, up, bias)
