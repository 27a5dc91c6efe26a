"""flux_core: a readable reimplementation of the FLUX.1 rectified-flow transformer.

Public API, close to the official BFL code: the model and autoencoder classes, presets, loaders,
the text encoders and the sampling functions.
"""

from .autoencoder import AutoEncoder, AutoEncoderParams
from .conditioner import TextEncoders, load_text_encoders  # transformers is imported when they are loaded
from .loading import CheckpointError, load_autoencoder, load_flow_model
from .model import Flux, FluxParams
from .presets import PRESETS, Preset, get_preset
from .recorder import Recorder
from .sampling import (
    Velocity,
    check_image_size,
    denoise,
    euler,
    get_noise,
    get_schedule,
    img_ids,
    pack,
    prepare,
    time_shift,
    txt_ids,
    unpack,
)
from .seam import DoubleBlockSite, Edit, EditSchedule, ModVectors, SingleBlockSite

__all__ = [
    "AutoEncoder",
    "AutoEncoderParams",
    "CheckpointError",
    "DoubleBlockSite",
    "Edit",
    "EditSchedule",
    "Flux",
    "FluxParams",
    "ModVectors",
    "PRESETS",
    "Preset",
    "Recorder",
    "SingleBlockSite",
    "TextEncoders",
    "Velocity",
    "check_image_size",
    "denoise",
    "euler",
    "get_noise",
    "get_preset",
    "get_schedule",
    "img_ids",
    "load_autoencoder",
    "load_flow_model",
    "load_text_encoders",
    "pack",
    "prepare",
    "time_shift",
    "txt_ids",
    "unpack",
]
