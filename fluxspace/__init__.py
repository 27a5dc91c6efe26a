"""fluxspace: FluxSpace semantic editing (Dalva et al., arXiv 2412.09611) inside our Flux model code.

    from fluxspace import Concept, EditSpec, edit_image, load_models
    models = load_models("path/to/model")
    result = edit_image(models, "a portrait", EditSpec(concepts=(Concept("eyeglasses", 5.0),)), seed=0)

The flux-mini domain, evaluator and training (fluxspace.mini) sit a layer above: importing
fluxspace does not import them.
"""

from .editing import EditResult, edit_image, mask_overlay
from .models import FluxModels, load_models
from .run import SamplingRun, generate
from .settings import SampleSettings
from .spec import Concept, EditSpec, validate
from .step import FluxSpaceEdit, FluxSpaceSchedule
from .sweep import sweep

__all__ = [
    "Concept",
    "EditResult",
    "EditSpec",
    "FluxModels",
    "FluxSpaceEdit",
    "FluxSpaceSchedule",
    "SampleSettings",
    "SamplingRun",
    "edit_image",
    "generate",
    "load_models",
    "mask_overlay",
    "sweep",
    "validate",
]
