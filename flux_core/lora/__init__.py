"""LoRA for FLUX.1 and FLUX.2: the file formats in use, read strictly, applied fused or unfused from outside the model.

    lora = read_lora("style.safetensors")                     # format from the keys, every key checked
    lora = read_lora("klein.safetensors", family="flux2")     # a FLUX.2 file (family_of(model) names it)
    updates = updates_for(lora, "flow", linear_shapes(flow))  # one LowRank per target Linear
    fused = fuse(flow, updates, scale=0.8); ...; fused.undo() # in the weights; undo is bit-exact
    scales = LoraScales(style=0.8); attach(flow, "style", updates, scales)   # unfused: change scales freely

    formats   the key grammar and module names of each format (diffusers/PEFT, kohya, bfl, xlabs)
    files     reading and checking a file; its updates against a model's Linear shapes
    apply     LowRank, fuse / Fused.undo, LoraLinear / attach / detach
"""

from .apply import Fused, LoraLinear, LoraScales, LowRank, attach, detach, family_of, fuse, linear_shapes
from .files import ForeignLoraError, LoraError, LoraFile, file_sha256, read_lora, updates_for
from .formats import FAMILIES, FORMATS

__all__ = [
    "FAMILIES",
    "FORMATS",
    "ForeignLoraError",
    "Fused",
    "LoraError",
    "LoraFile",
    "LoraLinear",
    "LoraScales",
    "LowRank",
    "attach",
    "detach",
    "family_of",
    "file_sha256",
    "fuse",
    "linear_shapes",
    "read_lora",
    "updates_for",
]
