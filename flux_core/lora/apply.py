"""Putting LoRA updates into a model, from outside the model files (STYLE.md rule 9): fused or unfused.

A LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3) changes a Linear's weight W (out, in) by a
low-rank product: W' = W + s * (alpha / r) * B @ A, A = `down` (r, in), B = `up` (out, r), s the
user's strength. Files give A, B and alpha per module; `files.py` folds alpha / r (and, for the
fused official layers, where the pieces go) into one `LowRank(down, up)` per target Linear, so that
here an update is just delta W = up @ down, times the strength s.

Two ways in, same result up to float rounding (tests/test_lora.py):

    fused     fuse(model, updates, s) adds s * up @ down to each weight once: no run-time cost. The
              weights it replaced are kept (in host memory) and `Fused.undo()` puts them back bit
              for bit. Fp8Linear weights are dequantized, updated and quantized again (a new scale).
    unfused   attach(model, updates) swaps each target for a LoraLinear that runs the original
              module and adds s_k * up_k(down_k(x)) per LoRA k; the strengths live in one shared
              `LoraScales` and may change between calls (sweeps over strength), and several LoRAs
              may sit on one model. detach(model) swaps the originals back.

Modules are found by their checkpoint names (`model.get_submodule`), so the same code serves the
transformer (official BFL names) and the text encoders (transformers' names). No hooks: a swapped
module is an ordinary submodule, so offload moves its LoRA tensors with it (they are buffers) and
regional compile traces it as part of its block. A changed strength is a Python float in the
compiled code: torch.compile compiles once more per new value (sweeps run a few values).

Letters: B batch, L tokens, R rank, I in features, O out features.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flux2.model import Flux2
from ..runtime.fp8 import Fp8Linear, quantize


def family_of(model: nn.Module) -> str:
    """The family name (formats.FAMILIES) to read LoRA files with for this transformer: "flux2" or "flux1"."""
    return "flux2" if isinstance(model, Flux2) else "flux1"


@dataclass(frozen=True)
class LowRank:
    """The update of one Linear, ready to apply: delta W = up @ down (alpha / r already in `up`)."""

    down: Tensor  # (R, I)
    up: Tensor  # (O, R)
    bias: Tensor | None = None  # (O,): a trained bias of B (the official LinearLora has one), also scaled

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> Tensor:
        """up @ down in float32: (O, I)."""
        return self.up.float() @ self.down.float()


def linear_weight(module: nn.Module) -> Tensor:
    """A Linear's or Fp8Linear's weight in float32 (an fp8 weight times its scale)."""
    if isinstance(module, Fp8Linear):
        return module.weight.float() * module.scale_weight
    return module.weight.float()


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> weight shape (O, I) of every Linear / Fp8Linear of `model` (a LoraLinear by its own name)."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            module = module.base
        elif name.endswith(".base") and isinstance(model.get_submodule(name.removesuffix(".base")), LoraLinear):
            continue
        if isinstance(module, nn.Linear | Fp8Linear):
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def check_target(model: nn.Module, name: str) -> nn.Module:
    """The Linear (or Fp8Linear) called `name` in `model`; a LookupError naming it if there is none."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise LookupError(f"no module {name!r} in this model") from None
    if isinstance(module, LoraLinear):
        module = module.base
    if not isinstance(module, nn.Linear | Fp8Linear):
        raise LookupError(f"{name!r} is a {type(module).__name__}, not a Linear: a LoRA updates Linear weights")
    return module


# ----------------------------------------------------------------------------------------------
# Fused


class Fused:
    """LoRA updates added into a model's weights; `undo()` restores the weights it replaced, bit for bit."""

    def __init__(self, model: nn.Module, originals: dict[str, dict[str, Tensor]]):
        self.model = model
        self.originals = originals  # module name -> {tensor name: the tensor as it was, on the CPU}
        self.undone = False

    def undo(self) -> None:
        """Put back every replaced tensor (copied to wherever the module now lives)."""
        if self.undone:
            raise RuntimeError("this fused LoRA was already undone")
        with torch.no_grad():
            for name, tensors in self.originals.items():
                module = self.model.get_submodule(name)
                for attr, original in tensors.items():
                    current = getattr(module, attr)
                    current.data = original.to(current.device)
        self.undone = True


def fuse(model: nn.Module, updates: Mapping[str, LowRank], scale: float) -> Fused:
    """Add scale * up @ down to the weight of each named Linear (float32 math, stored in the weight's dtype).

    The model must not be offloaded while this runs (its weights are where they are kept).
    """
    originals: dict[str, dict[str, Tensor]] = {}
    if scale == 0:  # nothing added: the weights stay exactly as they are
        return Fused(model, originals)
    with torch.no_grad():
        for name, update in updates.items():
            module = check_target(model, name)
            if update.bias is not None and module.bias is None:
                raise ValueError(f"the LoRA update of {name} has a bias; the Linear has none to add it to")
            weight = linear_weight(module) + scale * update.delta().to(module.weight.device)
            kept = ("weight", "scale_weight") if isinstance(module, Fp8Linear) else ("weight",)
            originals[name] = {attr: getattr(module, attr).data.cpu().clone() for attr in kept}
            if isinstance(module, Fp8Linear):
                module.weight.data, module.scale_weight.data = quantize(weight)
            else:
                module.weight.data = weight.to(module.weight.dtype)
            if update.bias is not None:
                originals[name]["bias"] = module.bias.data.cpu().clone()
                bias = module.bias.float() + scale * update.bias.float().to(module.bias.device)
                module.bias.data = bias.to(module.bias.dtype)
    return Fused(model, originals)


# ----------------------------------------------------------------------------------------------
# Unfused


class LoraScales(dict):
    """LoRA name -> strength, shared by every LoraLinear of a model: set a value, the next call uses it."""


class LoraLinear(nn.Module):
    """A Linear (or Fp8Linear) plus unfused LoRA updates: y = base(x) + sum_k s_k * up_k(down_k(x)).

    `base` is the original module, unchanged. Each LoRA's factors are buffers `<name>_down`,
    `<name>_up` (and `<name>_bias`) in the compute dtype, so they move with the module; its strength
    is read from the shared LoraScales at every call, and a LoRA at strength 0 is skipped (the
    output is then the base module's, bit for bit).
    """

    def __init__(self, base: nn.Module, scales: LoraScales):
        super().__init__()
        self.base = base
        self.scales = scales
        self.loras: list[str] = []

    # The wrapped Linear's attributes, for code that reads them (transformers' T5 checks wo.weight's dtype).
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add(self, name: str, update: LowRank) -> None:
        if name in self.loras:
            raise ValueError(f"LoRA {name!r} is already attached")
        # The compute dtype: an Fp8Linear's weight is float8, its bias is in the compute dtype.
        dtype = self.base.weight.dtype
        if isinstance(self.base, Fp8Linear):
            dtype = self.base.bias.dtype if self.base.bias is not None else torch.get_default_dtype()
        device = self.base.weight.device
        self.register_buffer(f"{name}_down", update.down.to(device, dtype))
        self.register_buffer(f"{name}_up", update.up.to(device, dtype))
        if update.bias is not None:
            self.register_buffer(f"{name}_bias", update.bias.to(device, dtype))
        self.loras.append(name)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (B, L, O)
        for name in self.loras:
            s = self.scales[name]
            if s != 0:
                down, up = getattr(self, f"{name}_down"), getattr(self, f"{name}_up")
                bias = getattr(self, f"{name}_bias", None)
                y = y + s * F.linear(F.linear(x, down), up, bias)  # (B, L, R) -> (B, L, O)
        return y

    def extra_repr(self) -> str:
        return f"loras={self.loras}"


def attach(model: nn.Module, name: str, updates: Mapping[str, LowRank], scales: LoraScales) -> None:
    """Put LoRA `name`'s updates on `model` unfused, at strength scales[name] (set it before calling)."""
    if not name.isidentifier():
        raise ValueError(f"LoRA name {name!r} must be a Python identifier (it names buffers)")
    if name not in scales:
        raise ValueError(f"no strength for LoRA {name!r} in the scales: set scales[{name!r}] first")
    for target, update in updates.items():
        check_target(model, target)
        module = model.get_submodule(target)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module, scales)
            parent, _, attr = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module)
        module.add(name, update)


def detach(model: nn.Module) -> None:
    """Swap every LoraLinear of `model` back for the module it wraps."""
    for target, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            parent, _, attr = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module.base)
