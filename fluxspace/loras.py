"""LoRAs on a loaded model: which files at which strengths, put on each part as the runtime loads it.

    models = load_models(loras=["style.safetensors:0.8"])             # fused: no run-time cost
    models = load_models(loras=[LoraSpec("style.safetensors", 0.8)], lora_mode="unfused")
    models.loras.set_scale(0.5)                                        # unfused: the next call uses it

The mechanism is flux_core.lora's; this file decides when it runs. Every file is read and checked
(format, keys, values; the transformer's targets against its header) before any part loads. Each
part gets its updates when the runtime builds it (runtime.py), so offload, staged reloads, fp8
weights and compile all see a LoRA'd part: fused LoRAs are added to the weights right after they
are read; unfused ones are LoraLinear modules holding the factors, moved with their blocks.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flux_core.files import WeightFiles
from flux_core.formats import FAMILIES
from flux_core.lora import (
    LoraError,
    LoraFile,
    LoraScales,
    attach,
    file_sha256,
    fuse,
    linear_shapes,
    read_lora,
    updates_for,
)

LORA_MODES = ("fused", "unfused")


def check_strength(scale, whose: str) -> None:
    """Refuse a LoRA strength that is not a finite number (bools included)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"LoRA strength {scale!r} {whose} must be a finite number")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file and strength (1: as trained; 0: off)."""

    path: Path
    scale: float = 1.0

    def __post_init__(self):
        check_strength(self.scale, f"for {self.path}")

    @classmethod
    def parse(cls, text: str | os.PathLike) -> "LoraSpec":
        """'FILE' or 'FILE:SCALE' (the part after the last ':' when FILE alone is not a file)."""
        text = str(text)
        if Path(text).is_file() or ":" not in text:
            return cls(Path(text))
        path, _, scale = text.rpartition(":")
        try:
            value = float(scale)
        except ValueError:
            raise ValueError(f"LoRA {text!r}: {scale!r} is not a strength; write FILE or FILE:SCALE, "
                             "e.g. style.safetensors:0.8") from None  # fmt: skip
        return cls(Path(path), value)


def as_spec(item) -> LoraSpec:
    return item if isinstance(item, LoraSpec) else LoraSpec.parse(item)


class Loras:
    """The LoRAs of one loaded model: files read and checked once, applied to each part as it loads.
    family: the model's ("flux1" or "flux2", its preset.family), whose module names the files are read
    against (load_models passes it)."""

    def __init__(self, specs, mode: str = "fused", family: str = "flux1"):
        if mode not in LORA_MODES:
            raise ValueError(f"unknown LoRA mode {mode!r}; valid: {', '.join(LORA_MODES)}")
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
        self.specs = [as_spec(s) for s in specs]
        self.mode = mode
        self.family = family
        self.files: list[LoraFile] = []
        for spec in self.specs:
            if not spec.path.is_file():
                raise FileNotFoundError(f"LoRA file not found: {spec.path}")
            self.files.append(read_lora(spec.path, family))
        self.names = [f"lora{k}" for k in range(len(self.specs))]  # buffer names of unfused LoRAs
        self.scales = LoraScales({n: s.scale for n, s in zip(self.names, self.specs, strict=True)})
        self._sha256: list[str] | None = None

    def __bool__(self) -> bool:
        return bool(self.specs)

    def check_flow(self, files: WeightFiles) -> None:
        """Every transformer update fits the transformer in `files` (its header): before anything loads."""
        shapes = {k.removesuffix(".weight"): s for k, s in files.bfl_shapes().items()
                  if k.endswith(".weight") and len(s) == 2}  # fmt: skip
        for lora in self.files:
            updates_for(lora, "flow", shapes)

    def apply(self, part: str, module: nn.Module) -> None:
        """Put every LoRA's updates on a freshly loaded part: "flow" (a Flux) or "text" (TextEncoders)."""
        if not self.files:
            return
        if part == "text" and self.family == "flux2":
            return  # FLUX.2 LoRA files update the transformer only (read_lora refuses text-encoder entries)
        if part == "text":
            clip = module.clip.text_model if hasattr(module.clip, "text_model") else module.clip  # transformers < 5
            self._apply("clip", clip)
            self._apply("t5", module.t5)
        else:
            self._apply(part, module)

    def _apply(self, part: str, module: nn.Module) -> None:
        shapes = linear_shapes(module)
        for name, lora in zip(self.names, self.files, strict=True):
            updates = updates_for(lora, part, shapes)
            if not updates:
                continue
            if self.mode == "fused":
                fuse(module, updates, self.scales[name])  # a reload reads the file again: no undo kept
            else:
                attach(module, name, updates, self.scales)

    def set_scale(self, scale: float, which: int | None = None) -> None:
        """Change the strength of every LoRA (or of LoRA number `which`): unfused LoRAs only."""
        if self.mode != "unfused":
            raise ValueError("LoRA strengths are fixed in fused mode (they are in the weights); "
                             "load with lora_mode='unfused' (--lora-mode unfused) to change them")  # fmt: skip
        check_strength(scale, "for set_scale")
        for k, name in enumerate(self.names):
            if which is None or which == k:
                self.scales[name] = float(scale)

    def summary(self) -> list[dict]:
        """What PNG metadata records of each LoRA: file name, sha256 of the file, format, strength."""
        if self._sha256 is None:
            self._sha256 = [file_sha256(s.path) for s in self.specs]
        return [
            {"file": s.path.name, "sha256": h, "format": f.format, "scale": self.scales[n]}
            for s, f, n, h in zip(self.specs, self.files, self.names, self._sha256, strict=True)
        ]


__all__ = ["LORA_MODES", "LoraError", "LoraSpec", "Loras", "as_spec"]
