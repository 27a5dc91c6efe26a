"""Check a weight file against a preset (FLUX.1 or FLUX.2): missing, unexpected and mis-shaped keys.

A file of the other family than the preset's is refused in one line (the family is read from the
keys: flux_core.formats.detect_family) instead of listing every key as missing.

The file is first checked as the loader checks it (flux_core.files.open_weights: the safetensors
header; flux_core.inference.check_metadata: our metadata values), so "OK" means that
`load_flow_model(path, preset)` (or `load_autoencoder(path, params=preset.ae_params)`) loads it.

The expected keys are the state dict of the preset's model built on the meta device (no memory),
so the check is exactly what `load_state_dict(strict=True)` would demand. Files with the
`model.diffusion_model.` prefix and diffusers-layout files are accepted (the latter are converted
on meta tensors first; keys are then reported under their official names), and so are fp8
transformer files: float8 tensors, and `scale_weight` keys checked as flux_core/runtime/fp8.py
reads them.

Also here: the committed inventories of the official files (weights_tools/inventory/*.json).
"""

import json
import os
from dataclasses import dataclass, field
from importlib import resources

from flux_core.files import CheckpointError, open_weights
from flux_core.formats import FAMILIES, ConversionError
from flux_core.inference import check_metadata, model_shapes
from flux_core.presets import MODEL_CLASSES, family_presets, get_preset
from flux_core.runtime.fp8 import fp8_layout, module_shapes

from .inspect import require_format

INVENTORIES = ("flux1-dev", "flux1-schnell", "ae")
SHOW = 10  # keys listed per kind of problem


def load_inventory(name: str) -> dict:
    """The committed inventory of an official file: {'tensors': {key: shape}, 'dtype': ..., ...}."""
    if name not in INVENTORIES:
        raise ValueError(f"unknown inventory {name!r}; valid: {', '.join(INVENTORIES)}")
    text = resources.files("weights_tools").joinpath("inventory", f"{name}.json").read_text()
    return json.loads(text)


@dataclass
class VerifyResult:
    path: str
    preset: str
    model: str  # "transformer" or "ae"
    layout: str  # "bfl" or "diffusers"
    num_tensors: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, found, expected
    problem: str | None = None  # a diffusers file that does not even convert
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped or self.problem)

    def format(self) -> str:
        what = f"{self.path} ({self.layout} {self.model}, {self.num_tensors} tensors)"
        if self.ok:
            return f"OK: {what} matches preset {self.preset!r}"
        lines = [f"FAIL: {what} does not match preset {self.preset!r}"]
        if self.problem:
            lines.append(f"  {self.problem}")
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                more = f" (first {SHOW})" if len(keys) > SHOW else ""
                lines.append(f"  {len(keys)} {label}{more}: " + ", ".join(keys[:SHOW]))
        if self.misshaped:
            more = f" (first {SHOW})" if len(self.misshaped) > SHOW else ""
            lines.append(f"  {len(self.misshaped)} mis-shaped{more}:")
            lines += [
                f"    {k}: file {found} != expected {expected}"
                for k, found, expected in self.misshaped[:SHOW]
            ]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def expected_shapes(preset: str, model: str) -> dict[str, tuple[int, ...]]:
    p = get_preset(preset)
    transformer_cls, ae_cls = MODEL_CLASSES[p.family]
    return model_shapes(transformer_cls, p.params) if model == "transformer" else model_shapes(ae_cls, p.ae_params)


# The variant each family's transformer is without guidance_in (with it: dev).
NO_GUIDANCE_VARIANT = {"flux1": "schnell", "flux2": "klein"}


def verify_file(path: str | os.PathLike, preset: str, model: str | None = None) -> VerifyResult:
    """Compare a file's keys and shapes with the preset's transformer or autoencoder (detected from the keys)."""
    get_preset(preset)  # an unknown name fails here, listing the valid ones
    ws = open_weights(path, model)  # refuses a file safetensors would not read
    layout, found_model = require_format(ws, path, model)
    try:
        check_metadata(ws.metadata)  # as the loader does: a bad value of one of our keys is refused
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    result = VerifyResult(str(path), preset, found_model, layout, len(ws.shapes))
    family = get_preset(preset).family
    if ws.family != family:  # every key would differ: say why instead of listing them
        result.problem = (
            f"the file holds a {FAMILIES[ws.family]} {found_model}, but preset {preset!r} is a {FAMILIES[family]} "
            f"model; {FAMILIES[ws.family]} presets: {', '.join(family_presets(ws.family))}"
        )
        return result
    try:
        found = ws.bfl_shapes()
    except ConversionError as e:
        result.problem = str(e)
        return result
    if found_model == "transformer":  # an fp8 file's scale_weight (& co.) belong to its layout, not the model
        found = module_shapes(found, fp8_layout(ws))
    expected = expected_shapes(preset, found_model)
    result.missing = sorted(expected.keys() - found.keys())
    result.unexpected = sorted(found.keys() - expected.keys())
    result.misshaped = sorted(
        (k, found[k], expected[k])
        for k in expected.keys() & found.keys()
        if tuple(found[k]) != tuple(expected[k])
    )
    guidance = {k for k in expected.keys() ^ found.keys() if k.startswith("guidance_in.")}
    other = NO_GUIDANCE_VARIANT[family]
    if guidance and guidance == set(result.missing):
        result.hint = f"the file has no guidance_in.*: it is a {other}-type model, the preset is dev-type"
    elif guidance and guidance == set(result.unexpected):
        result.hint = f"the file has guidance_in.*: it is a dev-type model, the preset is {other}-type"
    return result
