"""Kontext models in runs: the conditioning image checked, fitted and encoded.

A Kontext model (a preset with `kontext_resolutions`: FLUX.1 Kontext [dev], flux-mini-kontext)
generates an image from an instruction and an image to edit; the image enters as extra tokens
after the generated image's (flux_core.sampling.Condition). A text-to-image model takes no such
image (its real-image path is inversion). The image is fitted as the official prepare_kontext
fits it: to the training resolution closest in aspect ratio, LANCZOS; the generated image takes
that size unless the settings give another.
"""

from PIL import Image

from flux_core import Preset
from flux_core.sampling import Condition, preferred_size, prepare_condition

from .inversion import encode_latent, read_image
from .models import FluxModels


def check_condition(models: FluxModels, image) -> None:
    """Refuse, before any work, a Kontext model without an image and an image on a text-to-image model."""
    preset = models.preset
    if preset.kontext and image is None:
        raise ValueError(f"{preset.name} is a Kontext model: it edits an image by instruction; give the image "
                         "(--image FILE, image=...)")  # fmt: skip
    if image is not None and not preset.kontext:
        raise ValueError(f"{preset.name} draws from text only and takes no image to condition on; a Kontext model "
                         "does (--preset flux-kontext-dev, or flux-mini-kontext)")  # fmt: skip


def fit_condition(image, preset: Preset, pixels_per_token: int) -> Image.Image:
    """The image (a path or PIL image, read and checked) at the preset's closest training resolution."""
    image = read_image(image)
    w, h = preferred_size(*image.size, preset.kontext_resolutions, pixels_per_token)
    return image if image.size == (w, h) else image.resize((w, h), Image.LANCZOS)


def encode_condition(models: FluxModels, image: Image.Image, batch: int) -> Condition:
    """A fitted image as conditioning tokens for a batch, in the model's dtype."""
    return prepare_condition(encode_latent(models, image), batch)
