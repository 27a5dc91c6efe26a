"""fluxspace: FluxSpace semantic editing (Dalva et al., arXiv 2412.09611) inside our Flux model code.

    from fluxspace import Concept, EditSpec, edit_image, load_models
    models = load_models("path/to/model")
    result = edit_image(models, "a portrait", EditSpec(concepts=(Concept("eyeglasses", 5.0),)), seed=0)
"""

from .edit import Concept, EditSpec, validate
from .editing import EditResult, edit_image, mask_overlay
from .pipeline import FluxModels, SampleSettings, generate, load_models
from .step import FluxSpaceEditor, FluxSpaceStep
from .sweep import sweep

__all__ = [
    "Concept",
    "EditResult",
    "EditSpec",
    "FluxModels",
    "FluxSpaceEditor",
    "FluxSpaceStep",
    "SampleSettings",
    "edit_image",
    "generate",
    "load_models",
    "mask_overlay",
    "sweep",
    "validate",
]
