"""Weight-only fp8: the blocks' Linear weights stored as float8 e4m3fn with one float32 scale each.

Storage: W ~= weight * scale_weight, with weight a float8_e4m3fn tensor and scale_weight =
max|W| / 448 per tensor (448 is e4m3fn's largest finite value, so the largest weight lands on it).
Each weight keeps 3 mantissa bits: a relative rounding error of at most 2^-4 per weight, and less
on a layer's output, where the errors of many weights average out (benchmarks/fp8.py measures it).

Compute: each call of an Fp8Linear upcasts its own weight to the input's dtype (bf16 on a GPU)
and runs an ordinary F.linear, so the matmuls are those of the plain model; what changes is the
memory the weights take (1 byte each instead of 2) and the rounding of each weight. No fp8 matmul
(torch._scaled_mm, torchao) here: that needs an sm89+ GPU, and the weight-only path runs anywhere
torch can hold a float8 tensor (CPU, CUDA; not MPS in torch 2.x).

Which layers: every nn.Linear inside double_blocks.* and single_blocks.* (attention qkv and proj,
the MLPs, the modulations, linear1 and linear2): over 99% of the FLUX.1 transformer's weights
(benchmarks/fp8.py prints the share). The embedders (img_in, txt_in, time_in, vector_in,
guidance_in) and final_layer keep the compute dtype: a fraction of a percent of the bytes, and the
first and last layers see the raw inputs and write the velocity, where rounding costs the most.

The model files never change (STYLE.md rule 9): `quantize_linears` swaps modules from outside, as
gpt-fast's quantize.py does (its WeightOnlyInt8Linear also holds weight and scales as buffers).
State-dict keys stay those of the official files: `<module>.weight` (fp8), `<module>.bias`, plus
`<module>.scale_weight`, so a quantized model's state dict is a scaled fp8 file.

fp8 files in the wild (official BFL keys, with or without the `model.diffusion_model.` prefix):
- unscaled ("flux1-dev-fp8.safetensors", e4m3fn): the weights stored F8_E4M3, W = weight.
- scaled (ComfyUI's scaled_fp8_ops): a float32 scalar `<module>.scale_weight` beside each fp8
  weight, W = weight * scale_weight; sometimes `<module>.scale_input`, and a root marker tensor
  `scaled_fp8` whose dtype names the fp8 format (ComfyUI comfy/model_detection.py,
  model_config_from_unet, pops it). scale_input is the activation scale of ComfyUI's fp8-matmul
  path: x is divided by it before its fp8 cast and _scaled_mm multiplies it back, so it does not
  change the product; weight-only compute ignores it (as stable-diffusion.cpp does, PR #1898, which
  also notes that a scale_weight left unapplied silently gives white images: here it is always
  applied, or the file is refused).
Newer ComfyUI files (`weight_scale` + per-layer `comfy_quant` JSON) are not read: their keys are
reported as unexpected by the loader's strict check.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import CheckpointError, WeightFiles

FP8 = torch.float8_e4m3fn
# e4m3fn's largest finite value (torch.finfo(torch.float8_e4m3fn).max); casting above it gives NaN.
E4M3_MAX = 448.0
# How the model's weights are held: "full" in the compute dtype, "fp8" as above.
WEIGHTS_FORMATS = ("full", "fp8")

SCALE_WEIGHT = ".scale_weight"
SCALE_INPUT = ".scale_input"
SCALED_FP8_MARKER = "scaled_fp8"
# safetensors dtype names of float8 tensors -> the names users know them by.
FP8_NAMES = {"F8_E4M3": "e4m3fn", "F8_E5M2": "e5m2"}
SCALE_DTYPES = ("F32", "BF16", "F16")

_QUANTIZED_MODULE = re.compile(r"(double_blocks|single_blocks)\.\d+\.")


def is_quantized_module(name: str) -> bool:
    """Whether `--weights fp8` stores this module's weight as fp8 (when it is a Linear): see above."""
    return _QUANTIZED_MODULE.match(name) is not None


def is_quantized_weight(key: str, shape: tuple[int, ...]) -> bool:
    """The same rule on a state-dict key: inside the blocks, 2-D `.weight`s are the Linears' (the
    norms hold `.scale`, the LayerNorms nothing)."""
    return key.endswith(".weight") and len(shape) == 2 and is_quantized_module(key.removesuffix(".weight"))


def scale_key(weight_key: str) -> str:
    """`double_blocks.0.img_attn.qkv.weight` -> `double_blocks.0.img_attn.qkv.scale_weight`."""
    return weight_key.removesuffix(".weight") + SCALE_WEIGHT


def check_weights_format(weights: str, device: str | torch.device) -> None:
    """Refuse an unknown format, and fp8 on a device where torch cannot hold float8 tensors (MPS)."""
    if weights not in WEIGHTS_FORMATS:
        raise ValueError(f"unknown weights format {weights!r}; valid: {', '.join(WEIGHTS_FORMATS)}")
    if weights == "fp8":
        try:
            torch.zeros(1, dtype=FP8, device=device).to(torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):
            raise ValueError(
                f"fp8 weights need float8_e4m3fn tensors, which torch {torch.__version__} cannot hold on "
                f"{torch.device(device).type}; use --weights full (weights='full')"
            ) from None


# ----------------------------------------------------------------------------------------------
# Quantizing


def quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (any float dtype) -> (float8_e4m3fn tensor, float32 scale), weight ~= fp8 * scale.

    One scale per tensor: max|W| / 448 (1 for an all-zero tensor). Runs on meta tensors too (planning).
    """
    w = weight.float()
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / E4M3_MAX, 1.0)
    # Clamp first: rounding may push max|W| / scale a hair above 448, and e4m3fn has no inf (-> NaN).
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def quantize_state_dict(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official-layout tensors with the blocks' Linear weights as fp8 plus `<module>.scale_weight`
    (the scaled layout `flux-weights convert --to fp8` writes); everything else as given. A weight
    already stored as e4m3fn is kept as it is, with scale 1."""
    out = {}
    for key, t in tensors.items():
        if is_quantized_weight(key, tuple(t.shape)):
            out[key], out[scale_key(key)] = _to_fp8(t, None)
        else:
            out[key] = t
    return out


def _to_fp8(tensor: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """A weight as read from a file (with its scale_weight if it has one) -> (fp8 weight, scale)."""
    if tensor.dtype == FP8:  # already e4m3fn: kept bit for bit
        return tensor, scale if scale is not None else torch.ones((), device=tensor.device)
    return quantize(tensor if scale is None else tensor.float() * scale)


def _upcast(tensor: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype) if scale is None else (tensor.float() * scale).to(dtype)


class Fp8Linear(nn.Module):
    """A Linear whose weight is float8 e4m3fn with one float32 scale: W = weight * scale_weight.

    forward upcasts W to the input's dtype for that call only, then runs F.linear (weight-only
    fp8: the matmul is the plain one). The bias stays in the compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """The fp8 twin of `linear`: quantized from its weight, or empty if it is on the meta device."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        if w.device.type != "meta":
            new.weight, new.scale_weight = quantize(w.detach())
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: Tensor) -> Tensor:
        # The fp8 value is exact in bf16; times the float32 scale it is rounded once, to x's dtype.
        weight = self.weight.to(x.dtype) * self.scale_weight  # (out, in)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3fn"


def quantize_linears(model: nn.Module) -> nn.Module:
    """Swap, in place, every nn.Linear inside the double and single blocks for an Fp8Linear.

    On a meta-device model (the loader) the new modules are empty, ready for the file's tensors;
    on a loaded model each weight is quantized (per-tensor scale, see `quantize`). Returns `model`.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized_module(name):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Fp8Linear.from_linear(module))
    return model


# ----------------------------------------------------------------------------------------------
# fp8 files


@dataclass(frozen=True)
class Fp8Layout:
    """The fp8 part of a weight file, from its header: which tensors are float8 and which are scaled.

    Keys are module keys (the `model.diffusion_model.` prefix removed). `extra` holds the layout's
    keys that are no module's (scale_weight, scale_input, the scaled_fp8 marker): the loader checks
    every other key strictly against the model.
    """

    fp8: tuple[str, ...]  # tensors stored as float8
    formats: tuple[str, ...]  # their safetensors dtypes: F8_E4M3, F8_E5M2
    scales: dict[str, str]  # fp8 weight key -> its scale_weight key
    extra: frozenset[str]

    def describe(self) -> str:
        """'fp8 (e4m3fn), scaled, 504 fp8 tensors', or 'full' for a file without float8 tensors."""
        if not self.fp8:
            return "full"
        kind = "scaled" if self.scales else "unscaled"
        return f"fp8 ({'/'.join(FP8_NAMES[f] for f in self.formats)}), {kind}, {len(self.fp8)} fp8 tensors"


def _is_scalar(shape: tuple[int, ...]) -> bool:
    return shape in ((), (1,))


def fp8_layout(files: WeightFiles) -> Fp8Layout:
    """Read and check the fp8 layout of a file's header; raises CheckpointError naming the file.

    Each `<m>.scale_weight` must sit beside a float8 `<m>.weight` and be one number (shape () or
    (1,)) of a float dtype; `<m>.scale_input` one number; the extra keys only in the official layout.
    """
    fp8 = tuple(k for k, d in files.dtypes.items() if d in FP8_NAMES)
    extra = frozenset(k for k in files.shapes if k == SCALED_FP8_MARKER or k.endswith((SCALE_WEIGHT, SCALE_INPUT)))
    if extra and files.format is not None and files.format[0] != "bfl":
        raise CheckpointError(
            f"{files.path}: fp8 scale tensors ({sorted(extra)[0]}, ...) are read in the official (BFL) layout only; "
            "this file has diffusers keys"
        )
    scales = {}
    for key in sorted(extra - {SCALED_FP8_MARKER}):
        shape, dtype = files.shapes[key], files.dtypes[key]
        if not _is_scalar(shape) or dtype not in SCALE_DTYPES:
            raise CheckpointError(
                f"{files.path}: {key} is {dtype} {shape}; a fp8 scale is one number (shape () or (1,)) of dtype "
                f"{', '.join(SCALE_DTYPES)}"
            )
        if key.endswith(SCALE_WEIGHT):
            weight = key.removesuffix(SCALE_WEIGHT) + ".weight"
            if files.dtypes.get(weight) not in FP8_NAMES:
                found = f"is {files.dtypes[weight]}" if weight in files.dtypes else "is missing"
                raise CheckpointError(
                    f"{files.path}: {key} scales {weight}, which {found}; a scale_weight belongs beside a float8 "
                    f"weight ({', '.join(FP8_NAMES)})"
                )
            scales[weight] = key
    formats = tuple(sorted({files.dtypes[k] for k in fp8}))
    return Fp8Layout(fp8=fp8, formats=formats, scales=scales, extra=extra)


def module_shapes(shapes: dict[str, tuple[int, ...]], layout: Fp8Layout) -> dict[str, tuple[int, ...]]:
    """A file's shapes without its fp8 layout's extra keys: what the plain model's state dict must match."""
    return {k: s for k, s in shapes.items() if k not in layout.extra}


def quantized_count(files: WeightFiles) -> int:
    """Weights that `--weights fp8` holds at one byte each (the blocks' Linear weights), from the header."""
    return sum(
        s[0] * s[1] for k, s in files.bfl_shapes().items() if is_quantized_weight(k, s)
    )


def read_tensors(files: WeightFiles, model: nn.Module, device, dtype: torch.dtype) -> dict[str, Tensor]:
    """The state dict of `model` (built on meta, Fp8Linear modules in place where wanted) from files
    already checked against it, read one tensor at a time:

    - the weight of an Fp8Linear: kept if stored as e4m3fn (its scale_weight, else scale 1), else
      quantized as it is read: a bf16 file loaded as fp8 never holds more than one bf16 tensor;
    - any other tensor: in `dtype`; a float8 one times its scale_weight if it has one.

    A diffusers folder is converted in `dtype` first (fused tensors need all their parts at once),
    then quantized: its peak is one model in `dtype`.
    """
    layout = fp8_layout(files)
    fp8_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    if not fp8_weights and not layout.scales:
        return files.bfl_tensors(device, dtype)  # nothing to scale or quantize: the plain reader
    if files.format is not None and files.format[0] != "bfl":
        tensors = files.bfl_tensors(device, dtype)
        for key in fp8_weights:
            tensors[key], tensors[scale_key(key)] = quantize(tensors[key])
        return tensors
    out = {}
    with files.reader() as read:
        for key in files.shapes:
            if key in layout.extra:
                continue
            tensor = read(key).to(device)  # as stored: a float8 tensor travels at one byte per weight
            scale = _read_scale(files, read, layout.scales.get(key), device)
            if key in fp8_weights:
                out[key], out[scale_key(key)] = _to_fp8(tensor, scale)
            else:
                out[key] = _upcast(tensor, scale, dtype)
    return out


def _read_scale(files: WeightFiles, read, key: str | None, device) -> Tensor | None:
    if key is None:
        return None
    scale = read(key).to(device=device, dtype=torch.float32).reshape(())
    if not torch.isfinite(scale):
        raise CheckpointError(f"{files.path}: {key} is {scale.item()}; a scale_weight must be a finite number")
    return scale
