"""The LoRA file formats of FLUX.1 and FLUX.2, read from the keys: which module each low-rank pair updates.

A LoRA file stores, per module, a down matrix A (r, in), an up matrix B (out, r), sometimes an
alpha (strength alpha / r) and a bias of B. Formats differ in the module names and the suffixes:

    diffusers  PEFT / diffusers / ai-toolkit: `transformer.<diffusers module>.lora_A.weight`, `.lora_B.weight`
               (`.lora_A.default.weight` from PEFT's save; optional `<module>.alpha`, `.lora_B.bias`);
               text encoders `text_encoder.<CLIP module>`, `text_encoder_2.<T5 module>`
    kohya      sd-scripts: `lora_unet_<official module, dots as _>.lora_down.weight`, `.lora_up.weight`,
               `.alpha` (one per module, always written); `lora_transformer_<diffusers module, dots as _>`
               for the same grammar on diffusers names (ai-toolkit's older files); `lora_te1_` CLIP,
               `lora_te3_` T5 (sd-scripts networks/lora_flux.py: LORA_PREFIX_*)
    bfl        the official form (flux src/flux/modules/lora.py, the control LoRAs):
               `<official module>.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias`; no alpha
    xlabs      XLabs x-flux: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (1 the
               image stream, 2 the text stream), `single_blocks.N.processor.{qkv,proj}_lora.*`; no alpha

Names: every module a LoRA may update is one of the official transformer's Linears
(`FLOW_LINEARS`) or of the text encoders' (`CLIP_LINEARS`, `T5_LINEARS`, transformers' names). The
diffusers names of the transformer come from the one rename table of flux_core/formats.py: a
diffusers Linear that is part of a fused official one (to_q of qkv, proj_mlp of linear1) updates
a block of that module's output rows, and diffusers' norm_out.linear holds the two halves of
final_layer.adaLN_modulation.1 swapped. kohya names are the same names with dots written as `_`.

Families: the tables above are FLUX.1's (`FLUX1`). `FLUX2` swaps in FLUX.2's Linears
(`FLUX2_LINEARS`) and the rename table of flux_core/flux2/formats.py (only the double blocks' qkv is
split in diffusers; a single block's linear1 is one diffusers module); the grammar is shared. FLUX.2
files come in the diffusers/PEFT, kohya (`lora_unet_` on official names, as diffusers'
_convert_kohya_flux2_lora_to_diffusers reads them) and official forms; XLabs and text-encoder entries
(FLUX.2 encodes text with Qwen3 / Mistral, which no module table here covers) are refused.

Nothing here reads tensors or knows a model's sizes: `parse` maps keys to `Entry`s; files.py reads
and checks them.
"""

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import cache

from .. import formats as flux1_formats
from ..flux2 import formats as flux2_formats
from ..formats import BFL_PREFIX

FORMATS = ("diffusers", "kohya", "bfl", "xlabs")

# The official transformer's Linear modules (flux src/flux/model.py, modules/layers.py).
FLOW_LINEARS: tuple[str, ...] = (
    "img_in", "txt_in",
    "time_in.in_layer", "time_in.out_layer",
    "vector_in.in_layer", "vector_in.out_layer",
    "guidance_in.in_layer", "guidance_in.out_layer",
    *(f"double_blocks.{{i}}.{s}_{m}" for s in ("img", "txt")
      for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")),
    "single_blocks.{i}.linear1", "single_blocks.{i}.linear2", "single_blocks.{i}.modulation.lin",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)  # fmt: skip
# transformers' CLIPTextModel (its text transformer: `text_model.` before transformers 5, which files
# keep; read with or without it) and T5EncoderModel (T5 v1.1: gated wi_0 / wi_1).
CLIP_TEXT_MODEL = "text_model."
CLIP_LINEARS: tuple[str, ...] = tuple(
    f"encoder.layers.{{i}}.{m}"
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
)
T5_LINEARS: tuple[str, ...] = tuple(
    f"encoder.block.{{i}}.{m}"
    for m in ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
              "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
              "layer.1.DenseReluDense.wo")
)  # fmt: skip
# The text encoders, by their attribute in flux_core.conditioner.TextEncoders.
TEXT_PARTS = {"clip": CLIP_LINEARS, "t5": T5_LINEARS}
PARTS = ("clip", "t5", "flow")  # in the order a run uses them

# The official FLUX.2 transformer's Linears (flux2 src/flux2/model.py): shared modulations instead of
# per-block ones, SwiGLU MLPs (mlp.0 gives 2x the hidden width), no vector_in.
FLUX2_LINEARS: tuple[str, ...] = (
    "img_in", "txt_in",
    "time_in.in_layer", "time_in.out_layer",
    "guidance_in.in_layer", "guidance_in.out_layer",
    "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
    *(f"double_blocks.{{i}}.{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")),
    "single_blocks.{i}.linear1", "single_blocks.{i}.linear2",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)  # fmt: skip


@dataclass(frozen=True)
class Family:
    """What differs between model families for LoRA files: the transformer's Linears, the diffusers
    rename tables of that family's formats.py, the file formats read, and whether text encoders take
    LoRA entries. `name` is what messages call the model."""

    name: str
    linears: tuple[str, ...]
    renames: tuple[tuple[str, str], ...]
    fused: tuple  # of flux_core.formats.Fused
    half_swapped: tuple[tuple[str, str], ...]
    formats: tuple[str, ...]
    text_encoders: bool
    mlp_ratio: float  # the MLP's hidden width over the model width (the official models'; a hint, not a rule)
    gated_mlp: bool  # SwiGLU: the MLP's first Linear gives gate and value, twice the hidden width

    def mlp_proportions(self) -> dict[str, Fraction]:
        """Output over input features (exact fractions) of the Linears whose shape tells the families
        apart (the names are shared): a double block's MLP in and out, a single block's fused linear1
        (q, k, v and the MLP input) and linear2 (attention and MLP outputs in)."""
        r = Fraction(self.mlp_ratio)
        first = r * (2 if self.gated_mlp else 1)
        return {"_mlp.0": first, "_mlp.2": 1 / r, "linear1": 3 + first, "linear2": 1 / (1 + r)}


FLUX1 = Family("FLUX.1", FLOW_LINEARS, flux1_formats.TRANSFORMER_RENAMES, flux1_formats.TRANSFORMER_FUSED,
               flux1_formats.TRANSFORMER_HALF_SWAPPED, ("diffusers", "kohya", "bfl", "xlabs"), True,
               mlp_ratio=4.0, gated_mlp=False)  # fmt: skip
FLUX2 = Family("FLUX.2", FLUX2_LINEARS, flux2_formats.TRANSFORMER_RENAMES, flux2_formats.TRANSFORMER_FUSED,
               flux2_formats.TRANSFORMER_HALF_SWAPPED, ("diffusers", "kohya", "bfl"), False,
               mlp_ratio=3.0, gated_mlp=True)  # fmt: skip
FAMILIES: dict[str, Family] = {"flux1": FLUX1, "flux2": FLUX2}


def get_family(family: "str | Family") -> Family:
    """A Family, or one by its exact name in FAMILIES."""
    if isinstance(family, Family):
        return family
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[family]


@dataclass(frozen=True)
class Rows:
    """Which output rows of the target an update covers: parts `parts` of the target split into
    `of` parts as a fused official Linear splits (every part but the last as wide as the input,
    flux_core/formats.py: Fused), the first half / second half swapped if `swap`. None: all rows."""

    parts: tuple[int, ...]
    of: int
    swap: bool = False


@dataclass(frozen=True)
class Target:
    """The module a file's entry updates: `part` of the model ("flow", "clip" or "t5"), the module's
    name in that part (CLIP's without `text_model.`), and its rows."""

    part: str
    module: str
    rows: Rows | None = None


@dataclass(frozen=True)
class Entry:
    """One low-rank pair of a file: its keys, and the module it updates (None: unknown name)."""

    name: str  # the module name as the file spells it
    down: str | None
    up: str | None
    bias: str | None
    alpha: str | None
    dora: str | None
    target: Target | None


# ----------------------------------------------------------------------------------------------
# Module names of each format -> targets


@cache
def _pattern(name: str, underscores: bool) -> re.Pattern:
    text = re.escape(name.replace(".", "_") if underscores else name)
    return re.compile(text.replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _lookup(table: dict[str, Target], name: str, underscores: bool) -> Target | None:
    for pattern, target in table.items():
        m = _pattern(pattern, underscores).fullmatch(name)
        if m is not None:
            fields = m.groupdict()
            return Target(target.part, target.module.format(**fields), target.rows)
    return None


@cache
def official_names(family: Family = FLUX1) -> dict[str, Target]:
    return {p: Target("flow", p) for p in family.linears}


@cache
def diffusers_names(family: Family = FLUX1) -> dict[str, Target]:
    """diffusers module pattern -> the official module (and rows) it is, from the family's formats.py table."""
    table = {}
    for bfl, diffusers in family.renames:
        if bfl in family.linears:  # the table also renames norm scales, which no LoRA updates
            table[diffusers] = Target("flow", bfl)
    for fused in family.fused:
        for k, diffusers in enumerate(fused.diffusers):
            table[diffusers] = Target("flow", fused.bfl, Rows((k,), len(fused.diffusers)))
    for bfl, diffusers in family.half_swapped:
        table[diffusers] = Target("flow", bfl, Rows((0, 1), 2, swap=True))
    return table


@cache
def text_names(encoder: str) -> dict[str, Target]:
    return {p: Target(encoder, p) for p in TEXT_PARTS[encoder]}


def _text_target(encoder: str, name: str, underscores: bool) -> Target | None:
    if encoder == "clip":
        prefix = CLIP_TEXT_MODEL.replace(".", "_") if underscores else CLIP_TEXT_MODEL
        name = name.removeprefix(prefix)
    return _lookup(text_names(encoder), name, underscores)


# XLabs processor LoRAs (x-flux src/flux/modules/layers.py: DoubleStreamBlockLoraProcessor,
# SingleStreamBlockLoraProcessor): lora1 the image stream, lora2 the text stream; a single block's
# qkv_lora covers the q, k, v rows of linear1 (not its MLP rows).
XLABS_NAMES: dict[str, Target] = {
    "double_blocks.{i}.processor.qkv_lora1": Target("flow", "double_blocks.{i}.img_attn.qkv"),
    "double_blocks.{i}.processor.qkv_lora2": Target("flow", "double_blocks.{i}.txt_attn.qkv"),
    "double_blocks.{i}.processor.proj_lora1": Target("flow", "double_blocks.{i}.img_attn.proj"),
    "double_blocks.{i}.processor.proj_lora2": Target("flow", "double_blocks.{i}.txt_attn.proj"),
    "single_blocks.{i}.processor.qkv_lora": Target("flow", "single_blocks.{i}.linear1", Rows((0, 1, 2), 4)),
    "single_blocks.{i}.processor.proj_lora": Target("flow", "single_blocks.{i}.linear2"),
}


def _diffusers_target(name: str, family: Family) -> Target | None:
    # diffusion_model.: ai-toolkit's FLUX.2 files on diffusers names (diffusers' _convert_non_diffusers_flux2_lora_to_diffusers)
    for prefix in ("transformer.", "base_model.model.", "diffusion_model.", ""):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if prefix != "transformer." and rest.startswith(("text_encoder.", "text_encoder_2.")):
                break
            hit = _lookup(diffusers_names(family), rest, False)
            if hit is not None:
                return hit
    for prefix, encoder in (("text_encoder.", "clip"), ("text_encoder_2.", "t5")):
        if name.startswith(prefix) and family.text_encoders:
            return _text_target(encoder, name[len(prefix):], False)
    return None


def _kohya_target(name: str, family: Family) -> Target | None:
    for prefix, table in (("lora_unet_", official_names), ("lora_transformer_", diffusers_names)):
        if name.startswith(prefix):
            return _lookup(table(family), name[len(prefix):], True)
    for prefix, encoder in (("lora_te1_", "clip"), ("lora_te3_", "t5")):
        if name.startswith(prefix) and family.text_encoders:
            return _text_target(encoder, name[len(prefix):], True)
    return None


def _bfl_target(name: str, family: Family) -> Target | None:
    for prefix in (BFL_PREFIX, "diffusion_model.", "base_model.model.", ""):
        if name.startswith(prefix):
            hit = _lookup(official_names(family), name[len(prefix):], False)
            if hit is not None:
                return hit
    return None


def _xlabs_target(name: str, family: Family) -> Target | None:
    assert family is FLUX1, "XLabs LoRAs exist for FLUX.1 only"
    return _lookup(XLABS_NAMES, name.removeprefix("diffusion_model."), False)


# ----------------------------------------------------------------------------------------------
# Key grammar of each format: (format, suffix) -> role of the tensor


@dataclass(frozen=True)
class Grammar:
    down: tuple[str, ...]
    up: tuple[str, ...]
    bias: tuple[str, ...]
    alpha: tuple[str, ...]
    target: object  # (name, family) -> Target | None


GRAMMARS: dict[str, Grammar] = {
    "diffusers": Grammar((".lora_A.weight", ".lora_A.default.weight"), (".lora_B.weight", ".lora_B.default.weight"),
                         (".lora_B.bias", ".lora_B.default.bias"), (".alpha",), _diffusers_target),
    "kohya": Grammar((".lora_down.weight",), (".lora_up.weight",), (), (".alpha",), _kohya_target),
    "bfl": Grammar((".lora_A.weight",), (".lora_B.weight",), (".lora_B.bias",), (), _bfl_target),
    "xlabs": Grammar((".down.weight",), (".up.weight",), (), (), _xlabs_target),
}  # fmt: skip
DORA_SUFFIXES = (".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.default")


def detect(keys, family: "str | Family" = FLUX1) -> str | None:
    """The format of a LoRA file for a model of `family` from its keys; None if no key looks like a LoRA's.
    The format may be one the family does not read (files.py refuses it)."""
    family = get_family(family)
    keys = list(keys)
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya"
    if any(".processor." in k and k.endswith((".down.weight", ".up.weight")) for k in keys):
        return "xlabs"
    lora_a = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    if not lora_a:
        return None
    official = sum(_bfl_target(_module(k), family) is not None for k in lora_a)
    return "bfl" if official > len(lora_a) / 2 else "diffusers"


def _module(key: str) -> str:
    for grammar in GRAMMARS.values():
        for suffix in (*grammar.down, *grammar.up, *grammar.bias, *grammar.alpha, *DORA_SUFFIXES):
            if key.endswith(suffix):
                return key.removesuffix(suffix)
    return key


def parse(keys, fmt: str, family: "str | Family" = FLUX1) -> tuple[list[Entry], list[str]]:
    """The entries of a file in format `fmt` for a model of `family`, and the keys that are none of an entry's tensors."""
    family = get_family(family)
    if fmt not in family.formats:
        raise ValueError(f"{family.name} LoRA files are read in the {', '.join(family.formats)} formats, not {fmt}")
    grammar = GRAMMARS[fmt]
    roles = {"down": grammar.down, "up": grammar.up, "bias": grammar.bias, "alpha": grammar.alpha, "dora": DORA_SUFFIXES}
    found: dict[str, dict[str, str]] = {}
    left = []
    for key in keys:
        for role, suffixes in roles.items():
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None:
                found.setdefault(key.removesuffix(suffix), {})[role] = key
                break
        else:
            left.append(key)
    entries = [
        Entry(name, tensors.get("down"), tensors.get("up"), tensors.get("bias"), tensors.get("alpha"),
              tensors.get("dora"), grammar.target(name, family))
        for name, tensors in sorted(found.items())
    ]  # fmt: skip
    return entries, left
