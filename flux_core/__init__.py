"""flux_core: a readable reimplementation of the FLUX.1 rectified-flow transformer."""

from .autoencoder import AutoEncoderParams
from .model import Flux, FluxParams
from .presets import PRESETS, Preset, get_preset

__all__ = ["AutoEncoderParams", "Flux", "FluxParams", "PRESETS", "Preset", "get_preset"]
