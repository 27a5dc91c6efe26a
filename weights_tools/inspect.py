"""What a weight file holds: keys, shapes, dtypes, layout, family (FLUX.1 / FLUX.2), variant and the
inferred model shape.

Reads only the safetensors headers (flux_core.files.open_weights), never the tensors, so a 24 GB
file is inspected in milliseconds. A diffusers folder (transformer/ and vae/, sharded or not) is
inspected component by component; diffusers keys are converted on meta tensors to infer params.
"""

import math
import os
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from flux_core.files import (
    CheckpointError,
    WeightFiles,
    component_folders,
    open_weights,
    read_header,
    shard_files,
)
from flux_core.flux2.loading import check_flux2_autoencoder, check_flux2_model, detect_flux2_variant
from flux_core.formats import BFL_PREFIX, FAMILIES, ConversionError
from flux_core.inference import detect_variant
from flux_core.loading import check_autoencoder, check_flow_model
from flux_core.lora import ForeignLoraError, LoraError, read_lora
from flux_core.lora.files import mlp_families
from flux_core.lora.formats import detect as detect_lora
from flux_core.presets import PRESETS
from flux_core.runtime.fp8 import fp8_layout


def num_params(shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


# Numbered containers whose index is a block number (collapsed when grouping keys); other numbers
# (img_mlp.0, adaLN_modulation.1, to_out.0) are part of a layer's name and kept.
_CONTAINERS = r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|down|up|block|down_blocks|up_blocks|resnets|layers|layer)"
_INDEX = re.compile(_CONTAINERS + r"\.(\d+)(?=\.)")


def group_keys(shapes: dict, dtypes: dict) -> list[dict]:
    """Collapse block indices: double_blocks.{0..18}.img_attn.qkv.weight x19 (9216, 3072) BF16."""
    groups: dict[str, dict] = {}
    for key in sorted(shapes, key=_natural):
        indices = [int(m.group(2)) for m in _INDEX.finditer(key)]
        pattern = _INDEX.sub(lambda m: m.group(1) + ".*", key)
        g = groups.setdefault(
            pattern, {"indices": [set() for _ in indices], "shapes": Counter(), "dtypes": Counter()}
        )
        for slot, i in zip(g["indices"], indices, strict=True):
            slot.add(i)
        g["shapes"][tuple(shapes[key])] += 1
        g["dtypes"][dtypes[key]] += 1
    out = []
    for pattern, g in groups.items():
        name = pattern
        for slot in g["indices"]:
            lo, hi = min(slot), max(slot)
            span = f"{{{lo}..{hi}}}" if hi > lo else str(lo)
            name = name.replace("*", span, 1)
        out.append(
            {
                "keys": name,
                "count": sum(g["shapes"].values()),
                "shape": list(next(iter(g["shapes"]))) if len(g["shapes"]) == 1 else None,
                "shapes": len(g["shapes"]),
                "dtype": "/".join(sorted(g["dtypes"])),
            }
        )
    return out


def _natural(key: str):
    """Sort key: numbered parts by number (block 2 before block 10), any key comparable with any other."""
    return [(0, int(p), "") if p.isdecimal() else (1, 0, p) for p in key.split(".")]


# FLUX.1 [dev], Krea [dev] and Kontext [dev] have the same keys and shapes: only a name can tell them apart.
DEV_SHAPED_NOTE = ("dev-shaped: FLUX.1 [dev], Krea [dev] and Kontext [dev] share these keys; the model is "
                   "--preset flux-dev / flux-krea-dev / flux-kontext-dev, or the preset the file's metadata records")  # fmt: skip


# FLUX.2 [klein]: the distilled and base models have the same keys and shapes too.
KLEIN_SHAPED_NOTE = ("klein-shaped: FLUX.2 [klein] distilled and base models share these keys; the model is "
                     "--preset flux2-klein-4b / flux2-klein-base-4b (or the 9b pair), or the preset the file's "
                     "metadata records")  # fmt: skip
FLUX2_DEV_NOTE = "guidance-distilled: has guidance_in (FLUX.2 [dev]-shaped)"
# The loader's checks of each (family, model), on the headers alone.
CHECKS = {
    ("flux1", "transformer"): check_flow_model,
    ("flux1", "ae"): check_autoencoder,
    ("flux2", "transformer"): check_flux2_model,
    ("flux2", "ae"): check_flux2_autoencoder,
}


def inspect_weights(ws: WeightFiles, with_keys: bool = False) -> dict:
    """Everything `flux-weights inspect` reports, as a JSON-ready dict."""
    fmt = ws.format
    report = {
        "path": str(ws.path),
        "files": [str(f) for f in ws.files],
        "size_bytes": sum(f.stat().st_size for f in ws.files),
        "num_tensors": len(ws.shapes),
        "num_params": num_params(ws.shapes),
        "dtypes": dict(sorted(Counter(ws.dtypes.values()).items())),
        "layout": fmt[0] if fmt else "unknown",
        "model": fmt[1] if fmt else "unknown",
        "family": ws.family or "unknown",
        "key_prefix": BFL_PREFIX if ws.prefixed else None,
        "weights_format": "full",
        "variant": "unknown",
        "variant_note": None,
        "params": None,
        "matching_presets": [],
        "problem": None,
        "metadata": ws.metadata,
        "groups": group_keys(ws.shapes, ws.dtypes),
    }
    if fmt is not None:
        # The loader's own checks (flux_core.loading.check_*): params are shown only for a file that
        # loads without a preset, else the loader's refusal is the report's problem.
        try:
            report["weights_format"] = fp8_layout(ws).describe()  # e.g. 'fp8 (e4m3fn), scaled, 504 fp8 tensors'
            family = ws.family
            if fmt[1] == "ae":
                report["variant"] = "ae"
            elif family == "flux1":
                report["variant"] = detect_variant(ws.bfl_shapes())
                report["variant_note"] = DEV_SHAPED_NOTE if report["variant"] == "dev" else None
            else:
                report["variant"] = detect_flux2_variant(ws.bfl_shapes())
                report["variant_note"] = KLEIN_SHAPED_NOTE if report["variant"] == "klein" else FLUX2_DEV_NOTE
            recorded = (ws.metadata or {}).get("fluxspace.preset")
            if fmt[1] == "transformer" and recorded in PRESETS:  # the keys alone cannot tell Kontext from dev
                shaped = report["variant"]
                report["variant"] = recorded
                report["variant_note"] = f"the preset the file's metadata records; its keys are {shaped}-shaped"
            params = CHECKS[(family, fmt[1])](ws)
            part = "params" if fmt[1] == "transformer" else "ae_params"
            report["matching_presets"] = sorted(n for n, p in PRESETS.items() if getattr(p, part) == params)
            report["params"] = {"class": type(params).__name__, **asdict(params)}
        except (ConversionError, CheckpointError) as e:
            report["problem"] = f"does not load without a preset: {e}"
    if with_keys:
        report["keys"] = {
            k: {"shape": list(ws.shapes[k]), "dtype": ws.dtypes[k]} for k in sorted(ws.shapes, key=_natural)
        }
    return report


def _collapse(names) -> list[str]:
    """Module names with block indices collapsed: double_blocks.{0..18}.img_attn.qkv."""
    return [g["keys"] for g in group_keys({n + ".": () for n in names}, {n + ".": "" for n in names})]


def inspect_lora(path: Path, with_keys: bool = False) -> dict:
    """What `flux-weights inspect` reports of a LoRA file: format, ranks, alphas, the modules it updates, and
    the model family (FLUX.1, FLUX.2) it fits, by its module names and the official MLP proportions
    (flux_core.lora.files.mlp_families; a LoRA on attention Linears only, on official names, fits both)."""
    shapes, dtypes, metadata = read_header(path)
    report = {
        "path": str(path), "files": [str(path)], "size_bytes": path.stat().st_size, "model": "lora",
        "num_tensors": len(shapes), "num_params": num_params(shapes),
        "dtypes": dict(sorted(Counter(dtypes.values()).items())), "format": detect_lora(shapes), "families": [],
        "official_mlp": False, "mlp_shapes_of": [],
        "ranks": [], "alphas": [], "strengths": [], "entries": 0, "targets": {}, "problem": None, "metadata": metadata,
    }  # fmt: skip
    read, problems = [], {}
    for family in FAMILIES:
        try:
            lora = read_lora(path, family)
        except LoraError as e:
            problems[FAMILIES[family]] = e
        else:
            read.append(lora)
    if not read:  # the problem of the family whose names the file has, else each family's
        said = {name: str(e) for name, e in problems.items() if not isinstance(e, ForeignLoraError)}
        said = said or {name: str(e) for name, e in problems.items()}
        distinct = set(said.values())
        report["problem"] = distinct.pop() if len(distinct) == 1 else "; ".join(f"as a {n} LoRA: {e}" for n, e in said.items())
    else:
        # names shared by both families: the MLP updates' proportions decide (mlp_families), where they can
        fitting = [r for r in read if all(r.family.name in mlp_families(p) for p in r.pieces)]
        lora = (fitting or read)[0]
        report["families"] = [r.family.name for r in fitting or read]
        report["official_mlp"] = bool(fitting)
        # names of one family, MLP shapes of the other's official models: say so
        shaped = set.intersection(*(set(mlp_families(p)) for p in lora.pieces)) if lora.pieces else set()
        report["mlp_shapes_of"] = sorted(shaped) if not fitting else report["families"]
        report["format"], report["ranks"], report["alphas"] = lora.format, lora.ranks(), lora.alphas()
        report["entries"] = len(lora.pieces)
        report["strengths"] = sorted({p.alpha / p.rank if p.alpha is not None else 1.0 for p in lora.pieces})
        report["targets"] = {part: [n.removesuffix(".") for n in _collapse(lora.targets(part))] for part in lora.parts}
    if with_keys:
        report["keys"] = {k: {"shape": list(shapes[k]), "dtype": dtypes[k]} for k in sorted(shapes, key=_natural)}
    return report


def format_lora_report(report: dict) -> str:
    parts = {"flow": "transformer", "clip": "CLIP", "t5": "T5"}
    lines = [
        f"path      {report['path']} ({_human_bytes(report['size_bytes'])})",
        f"LoRA      {report['format']} format, {report['entries']} low-rank pairs, {report['num_tensors']} tensors, "
        + ", ".join(f"{d} x{n}" for d, n in report["dtypes"].items()),
        "model     " + (" or ".join(report["families"]) or "-") + _family_note(report),
        "rank      " + (", ".join(map(str, report["ranks"])) or "-"),
        "alpha     " + (", ".join(f"{a:g}" for a in report["alphas"]) or "none (strength 1 per pair)"),
        "alpha/r   " + (", ".join(f"{a:g}" for a in report["strengths"]) or "-"),
    ]
    for part, names in report["targets"].items():
        lines.append(f"updates   {parts[part]}: {len(names)} module groups")
        lines += [f"  {n}" for n in names]
    lines += _problem_metadata_keys(report)
    return "\n".join(lines)


def _family_note(report: dict) -> str:
    if not report["families"]:
        return ""
    if not report["official_mlp"]:
        other = report.get("mlp_shapes_of") or []
        if len(other) == 1:
            return f" by its module names, but its MLP shapes are {other[0]}'s"
        return " by its module names (its MLP shapes are no official model's: a model of another MLP ratio)"
    return " (it updates modules both have, of the same shapes)" if len(report["families"]) > 1 else ""


def _problem_metadata_keys(report: dict) -> list[str]:
    """The lines every report ends with: the problem, the metadata, and every key if asked (--keys)."""
    lines = []
    if report["problem"]:
        lines.append(f"problem   {report['problem']}")
    if report["metadata"]:
        lines.append("metadata  " + ", ".join(f"{k}={v}" for k, v in sorted(report["metadata"].items())))
    if "keys" in report:
        lines.append("keys:")
        lines += [f"  {k}  {tuple(v['shape'])}  {v['dtype']}" for k, v in report["keys"].items()]
    return lines


def inspect_path(path: str | os.PathLike, with_keys: bool = False, model: str | None = None) -> list[dict]:
    """One report per model: a file or shard folder gives one, a diffusers pipeline folder one per component,
    separate files side by side one per file (_separate), a LoRA file its own report (inspect_lora)."""
    path = Path(path)
    if path.is_file() and model is None and detect_lora(read_header(path)[0]) is not None:
        return [inspect_lora(path, with_keys)]
    if path.is_dir() and model is None:
        files = shard_files(path)
        if not files and component_folders(path):
            return [inspect_weights(open_weights(path, m), with_keys) for m in component_folders(path)]
        if len(files) > 1 and not any(path.glob("*.safetensors.index.json")) and _separate(files):
            return [report for file in files for report in inspect_path(file, with_keys)]
    return [inspect_weights(open_weights(path, model), with_keys)]


def _separate(files: list[Path]) -> bool:
    """Whether index-less files side by side are separate models (a report each), not the shards of one:
    a transformer file with ae.safetensors beside it (the official repositories' roots, our sets), LoRA
    files, or files whose keys overlap (shards never share a key)."""
    if any(f.name == "ae.safetensors" for f in files):
        return True
    seen: set[str] = set()
    for f in files:
        keys = set(read_header(f)[0])
        if detect_lora(keys) is not None or keys & seen:
            return True
        seen |= keys
    return False


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_report(report: dict) -> str:
    """The human-readable form of one `inspect_weights` (or `inspect_lora`) report."""
    if report["model"] == "lora":
        return format_lora_report(report)
    layout = {"bfl": "official (BFL)", "diffusers": "diffusers", "unknown": "unknown"}[report["layout"]]
    lines = [
        f"path      {report['path']} ({len(report['files'])} file(s), {_human_bytes(report['size_bytes'])})",
        f"layout    {layout} {report['model']}"
        + (f", keys prefixed {report['key_prefix']!r}" if report["key_prefix"] else ""),
        f"family    {FAMILIES.get(report['family'], 'unknown')}",
        f"variant   {report['variant']}" + (f" ({report['variant_note']})" if report.get("variant_note") else ""),
        f"weights   {report['weights_format']}",
        f"tensors   {report['num_tensors']}, {report['num_params']:,} parameters, dtypes "
        + ", ".join(f"{d} x{n}" for d, n in report["dtypes"].items()),
    ]
    if report["params"]:
        params = {k: v for k, v in report["params"].items() if k != "class"}
        lines.append(
            f"params    {report['params']['class']}(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
        )
        lines.append("presets   " + (", ".join(report["matching_presets"]) or "none match exactly"))
    lines += _problem_metadata_keys(report)
    if "keys" not in report:
        lines.append(f"keys      {len(report['groups'])} groups (--keys lists every key):")
        for g in report["groups"]:
            shape = str(tuple(g["shape"])) if g["shape"] is not None else f"{g['shapes']} shapes"
            count = [f"x{g['count']}"] if g["count"] > 1 else []
            lines.append("  " + "  ".join([g["keys"], *count, shape, g["dtype"]]))
    return "\n".join(lines)


MODEL_NAMES = {"transformer": "a Flux transformer", "ae": "an autoencoder"}


def require_format(ws: WeightFiles, path, model: str | None) -> tuple[str, str]:
    """(layout, model) of a weight set, or a CheckpointError saying what it is not."""
    if ws.format is None:
        raise CheckpointError(
            f"{path} holds neither a Flux transformer nor a Flux autoencoder (official or diffusers keys)"
        )
    layout, found = ws.format
    if model is not None and model != found:
        raise CheckpointError(f"{path} holds {MODEL_NAMES[found]}, not {MODEL_NAMES[model]}")
    return layout, found
