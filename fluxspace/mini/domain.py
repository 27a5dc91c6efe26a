"""Old home of the flux-mini domain, kept only for the two importers outside this package's refactor.

The domain now lives in attributes.py (families, Attributes, split, sampling), pen.py (the two-style
pen), render.py (the renderer), regions.py (regions of the local attributes) and sheet.py (the docs'
contact sheet). fluxspace/mini/edit_quality.py and tests/test_edit_quality.py still import the names
below from here; delete this file once they import them from their new modules.
"""

from .attributes import FAMILIES, KIND, Attributes, sample_attributes
from .regions import region
from .render import render

__all__ = ["FAMILIES", "KIND", "Attributes", "region", "render", "sample_attributes"]
