"""flux-mini: a small Flux trained on a procedural domain of captioned cartoon faces (issue 4).

The domain: attributes.py (families, values, kinds, the held-out split, sampling), render.py (a face
from attributes and a seed, drawn with pen.py), regions.py (where each local attribute can change
pixels), sheet.py (the contact sheet of docs/mini_domain.md); captions.py: captions.
The trained model ships in weights/flux-mini/ (built by `python -m fluxspace.mini.build`) and is the
default model of `fluxspace generate | edit | sweep` and `fluxspace.load_models()`.
"""

from pathlib import Path

from .attributes import (
    FAMILIES,
    KIND,
    LOCAL_FAMILIES,
    N_COMBINATIONS,
    Attributes,
    all_combinations,
    is_held_out,
    sample_attributes,
)
from .regions import region
from .render import render, render_batch, to_tensor

MODEL_DIR = Path(__file__).resolve().parent / "weights" / "flux-mini"


def model_path() -> Path:
    """The shipped flux-mini folder (transformer, ae.safetensors, text encoders), laid out like the official release."""
    if not (MODEL_DIR / "flux-mini.safetensors").is_file():
        raise FileNotFoundError(
            f"flux-mini is missing from this install ({MODEL_DIR}); reinstall the package, or build it with "
            "`python -m fluxspace.mini.build --out FOLDER` and pass --model FOLDER"
        )
    return MODEL_DIR


__all__ = [
    "MODEL_DIR",
    "model_path",
    "FAMILIES",
    "KIND",
    "LOCAL_FAMILIES",
    "N_COMBINATIONS",
    "Attributes",
    "all_combinations",
    "is_held_out",
    "region",
    "render",
    "render_batch",
    "sample_attributes",
    "to_tensor",
]
