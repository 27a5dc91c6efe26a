"""A loaded model: find the four parts of a Flux model, read which preset they are, load them.

The pieces (transformer, autoencoder, text encoders) come from flux_core; this file only decides
where to find them and which preset gives their defaults. Without a model the shipped flux-mini is
used: the library finds its files without importing the flux-mini domain (fluxspace/mini/).
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flux_core import Flux, FluxParams, get_preset
from flux_core.autoencoder import AutoEncoder, AutoEncoderParams
from flux_core.conditioner import TEXT_ENCODER_FOLDERS, check_text_encoder_folder
from flux_core.files import CheckpointError, WeightFiles, open_weights
from flux_core.formats import FAMILIES
from flux_core.inference import META_PRESET
from flux_core.loading import (
    check_autoencoder,
    check_flow_model,
    load_autoencoder,
    load_flow_model,
    resolve_dtype,
)
from flux_core.presets import PRESETS, AnyPreset, family_presets
from flux_core.runtime.fp8 import check_weights_format, quantized_count

from .loras import Loras
from .runtime import Residency, Runtime, resident_bytes
from .settings import SampleSettings

if TYPE_CHECKING:  # the text encoders pull in `transformers`: imported when a model is loaded
    from flux_core.conditioner import TextEncoders

# The shipped flux-mini (transformer, ae.safetensors, text encoders), laid out like the official
# release. Package data of fluxspace.mini, which builds it (`python -m fluxspace.mini.build`).
FLUX_MINI_DIR = Path(__file__).resolve().parent / "mini" / "weights" / "flux-mini"


def flux_mini_path() -> Path:
    """The shipped flux-mini folder; a clear error if this install lacks it."""
    if not (FLUX_MINI_DIR / "flux-mini.safetensors").is_file():
        raise FileNotFoundError(
            f"flux-mini is missing from this install ({FLUX_MINI_DIR}); reinstall the package, or build it with "
            "`python -m fluxspace.mini.build --out FOLDER` and pass --model FOLDER"
        )
    return FLUX_MINI_DIR


# Our shipped models by name (`--model flux-mini-kontext`): the transformer file; the autoencoder and
# text encoders are flux-mini's for both (flux-mini-kontext is flux-mini fine-tuned: train_kontext.py).
SHIPPED: dict[str, str] = {
    "flux-mini": "flux-mini/flux-mini.safetensors",
    "flux-mini-kontext": "flux-mini-kontext/flux-mini-kontext.safetensors",
}


def shipped_paths(name: str) -> "ModelPaths":
    """The files of a shipped model; a clear error if this install lacks them."""
    transformer = FLUX_MINI_DIR.parent / SHIPPED[name]
    if not transformer.is_file():
        raise FileNotFoundError(f"{name} is not in this install ({transformer} is missing); flux-mini-kontext is "
                                "made by `python -m fluxspace.mini.train_kontext --out FOLDER`")  # fmt: skip
    return ModelPaths(transformer, FLUX_MINI_DIR / "ae.safetensors", FLUX_MINI_DIR)


@dataclass(frozen=True)
class ModelPaths:
    """Where each part of a model lives. A diffusers folder serves as all three."""

    transformer: Path
    ae: Path
    text_encoders: Path


def _is_text_encoder_folder(folder: Path) -> bool:
    return all((folder / d).is_dir() for d in TEXT_ENCODER_FOLDERS)


def resolve_paths(model: str | os.PathLike, ae: str | None = None, text_encoders: str | None = None) -> ModelPaths:
    """Find the transformer, autoencoder and text encoders from what the user gave.

    model: a transformer .safetensors file (the AE is then `ae.safetensors` beside it and the text
    encoders the folder it sits in), a folder holding such a file and ae.safetensors, a diffusers
    folder (transformer/, vae/, text_encoder*/, tokenizer*/), or the name of a shipped model
    (SHIPPED: flux-mini, flux-mini-kontext). `ae` and `text_encoders` override.
    """
    if str(model) in SHIPPED and not Path(model).exists():
        shipped = shipped_paths(str(model))
        return ModelPaths(shipped.transformer, Path(ae) if ae else shipped.ae,
                          Path(text_encoders) if text_encoders else shipped.text_encoders)  # fmt: skip
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"model not found: {model} (pass a .safetensors file, a model folder, or a shipped "
                                f"model's name: {', '.join(SHIPPED)})")  # fmt: skip
    if model.is_dir() and (model / "transformer").is_dir():
        transformer, default_ae, default_te = model, model, model
    elif model.is_dir():
        candidates = sorted(p for p in model.glob("*.safetensors") if p.name != "ae.safetensors")
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise FileNotFoundError(
                f"{model} should hold exactly one transformer .safetensors besides ae.safetensors; found: {found}. "
                "Pass the transformer file itself instead."
            )
        transformer, default_ae, default_te = candidates[0], model / "ae.safetensors", model
    else:
        transformer, default_ae, default_te = model, model.parent / "ae.safetensors", model.parent
    if transformer_family(transformer) == "flux2":  # before looking for FLUX.1's text encoders beside it
        from . import flux2

        return ModelPaths(transformer, *flux2.find_parts(transformer, default_ae, default_te, ae, text_encoders))
    ae_path = Path(ae) if ae else default_ae
    te_path = Path(text_encoders) if text_encoders else default_te
    if not ae_path.exists():
        raise FileNotFoundError(f"autoencoder not found at {ae_path}; pass --ae PATH/TO/ae.safetensors")
    if not _is_text_encoder_folder(te_path):
        missing = [d for d in TEXT_ENCODER_FOLDERS if not (te_path / d).is_dir()]
        raise FileNotFoundError(
            f"text encoders not found in {te_path} (missing {', '.join(d + '/' for d in missing)}); "
            "pass --text-encoders FOLDER laid out like the official repositories "
            "(text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)"
        )
    return ModelPaths(transformer, ae_path, te_path)


def resolve_preset(paths: ModelPaths, preset: str | None) -> AnyPreset:
    """An explicit preset wins; else the preset our writers record in the file; else one read from the file.

    The transformer's headers pass every check of the loader first. A preset of the other family than
    the file's is refused in one line; FLUX.2 files are resolved by fluxspace/flux2.py (detect_preset)."""
    files = _open_transformer(paths.transformer)
    family = files.family if files is not None else None
    if preset is not None:
        chosen = get_preset(preset)
        if family is not None and chosen.family != family:
            raise ValueError(
                f"preset {chosen.name!r} is a {FAMILIES[chosen.family]} model but {paths.transformer} is a "
                f"{FAMILIES[family]} transformer; {FAMILIES[family]} presets: {', '.join(family_presets(family))}"
            )
        if family == "flux2":
            from . import flux2

            return flux2.check_preset(chosen, files)
        return chosen
    files = open_weights(paths.transformer, "transformer")  # unreadable: the error names the problem
    if family == "flux2":
        from . import flux2

        return flux2.detect_preset(paths.transformer, files)
    params = check_flow_model(files)
    recorded = files.metadata.get(META_PRESET)
    if recorded is not None:
        if recorded not in PRESETS or PRESETS[recorded].family != "flux1":
            raise CheckpointError(
                f"{paths.transformer} records preset {recorded!r}, which this version does not know "
                f"(known: {', '.join(family_presets('flux1'))}); pass --preset NAME to choose one"
            )
        return PRESETS[recorded]
    if params.guidance_embed and diffusers_pipeline(paths.transformer) == "FluxKontextPipeline":
        return PRESETS["flux-kontext-dev"]  # Kontext's keys equal dev's; its diffusers folder names its pipeline
    return PRESETS["flux-dev" if params.guidance_embed else "flux-schnell"]


def _open_transformer(transformer: Path) -> WeightFiles | None:
    """The transformer's headers, or None where they cannot be read (the loader's checks then say why)."""
    try:
        return open_weights(transformer, "transformer")
    except CheckpointError:
        return None


def transformer_family(transformer: Path) -> str | None:
    """'flux1' or 'flux2' by the transformer's keys; None for files that cannot be read or are neither."""
    files = _open_transformer(transformer)
    return files.family if files is not None else None


def diffusers_index(folder: Path) -> dict:
    """A diffusers folder's model_index.json ({} if there is none or it cannot be read)."""
    index = folder / "model_index.json"
    if not (folder.is_dir() and index.is_file()):
        return {}
    try:
        found = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # an unreadable index says nothing; the keys decide
    return found if isinstance(found, dict) else {}


def diffusers_pipeline(folder: Path) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names (None: no such file)."""
    return diffusers_index(folder).get("_class_name")


def text_length(preset: AnyPreset) -> int:
    """Text tokens a prompt is padded to: T5's max length (FLUX.1) or the FLUX.2 LLM's 512."""
    if preset.family == "flux2":
        from .flux2 import text_length as flux2_text_length

        return flux2_text_length(preset)
    return preset.t5_max_length


@dataclass(frozen=True)
class FamilyLoaders:
    """How one family's parts are checked (on the headers alone) and loaded: the only place load_models
    tells FLUX.1 from FLUX.2 (whose functions live in fluxspace/flux2.py)."""

    check_model: Callable  # (files, preset or None) -> the transformer's params
    check_ae: Callable  # (files) -> the autoencoder's params
    check_text: Callable  # (folder, preset, params): the text-encoder folder fits
    check_loras: Callable  # (Loras, files): every LoRA fits the transformer
    load_model: Callable  # (path, preset or None, device, dtype, weights) -> transformer
    load_ae: Callable  # (path, device, dtype) -> autoencoder
    load_text: Callable  # (folder, preset, device, dtype) -> text encoder(s)


def family_loaders(preset: AnyPreset) -> FamilyLoaders:
    """The loaders of the preset's family."""
    if preset.family == "flux2":
        from . import flux2

        return FamilyLoaders(
            flux2.check_model, flux2.check_ae, lambda folder, p, params: flux2.check_text(folder, p, params.context_in_dim),
            lambda loras, files: loras.check_flow(files), flux2.load_model, flux2.load_ae, flux2.load_text,
        )  # fmt: skip
    from flux_core.conditioner import load_text_encoders

    return FamilyLoaders(
        check_flow_model, check_autoencoder, lambda folder, p, params: check_text_encoder_folder(folder),
        lambda loras, files: loras.check_flow(files),
        lambda path, p, device, dtype, weights: load_flow_model(path, preset=p, device=device, dtype=dtype, weights=weights),
        lambda path, device, dtype: load_autoencoder(path, device=device, dtype=dtype),
        lambda folder, p, device, dtype: load_text_encoders(folder, t5_max_length=p.t5_max_length, device=device, dtype=dtype),
    )  # fmt: skip


@dataclass
class FluxModels:
    """A loaded model: transformer, autoencoder, text encoders, and the preset giving its defaults.

    `flow`, `ae` and `text` hand out a part ready to run: each access is a use of that part
    (runtime.Runtime.use), which, depending on the residency, loads it, brings it to its device and
    sends back or frees the part used before. Read sizes and settings from `params`, `ae_params`
    and `dtype`, which touch no part.
    """

    runtime: Runtime
    params: FluxParams  # the transformer's, from the file header (FLUX.2: Flux2Params)
    ae_params: AutoEncoderParams  # (FLUX.2: flux_core.flux2.autoencoder.AutoEncoderParams)
    preset: AnyPreset
    paths: ModelPaths
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    weights: str = "full"  # how the transformer holds its weights: "full" or "fp8" (flux_core/runtime/fp8.py)
    compiled: bool = False  # the transformer's blocks run under torch.compile (flux_core.runtime)
    loras: Loras = field(default_factory=lambda: Loras(()))  # LoRAs on the transformer / text encoders

    @property
    def flow(self) -> Flux:
        return self.runtime.use("flow")

    @property
    def ae(self) -> AutoEncoder:
        return self.runtime.use("ae")

    @property
    def text(self) -> "TextEncoders":
        return self.runtime.use("text")

    @property
    def family(self) -> str:
        """'flux1' or 'flux2': which sampling path a run takes (run.py, fluxspace/flux2.py)."""
        return self.preset.family

    @property
    def text_length(self) -> int:
        return text_length(self.preset)

    @property
    def residency(self) -> Residency:
        return self.runtime.residency

    @property
    def pixels_per_token(self) -> int:
        """Image pixels along the side of one image token: 2 x the autoencoder's downsampling."""
        return 2 * self.ae_params.downsampling

    def token_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of image tokens for an image of width x height pixels."""
        return height // self.pixels_per_token, width // self.pixels_per_token

    def sample_settings(self, settings: SampleSettings | None, *, real_image: bool = False) -> SampleSettings:
        """settings (None: all defaults) with the preset's defaults filled in, checked for this model."""
        return (settings or SampleSettings()).resolve(self.preset, self.pixels_per_token, real_image=real_image)


def load_models(
    model: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    ae: str | None = None,
    text_encoders: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    weights: str = "full",
    offload: str = "none",
    text_device: str | None = None,
    staged: bool = False,
    residency: Residency | None = None,
    compile: bool = False,
    loras=(),
    lora_mode: str = "fused",
) -> FluxModels:
    """Load transformer, autoencoder and text encoders; the preset is checked against the file.

    model: see resolve_paths; None loads the shipped flux-mini.
    weights: "fp8" holds the transformer's block Linears as float8 e4m3fn with a per-tensor scale,
    computing in `dtype` (flux_core/runtime/fp8.py); the autoencoder and text encoders stay in `dtype`.
    offload: "none" (every part stays on `device`), "model" (each part on the device only while it
    runs) or "blocks" (also the transformer's blocks streamed in groups; CUDA only). text_device:
    where T5 and CLIP run (default: `device`). staged: load each part when first used and free it
    when another part runs (peak memory of the largest part). See runtime.py. residency: all of
    these as one runtime.Residency (then leave offload, text_device and staged at their defaults).
    Every file header is checked before anything is loaded, staged or not.
    compile: compile each transformer block once (flux_core.runtime.compile_blocks): the first
    forward takes seconds longer, the following ones are faster. Refused before loading where torch
    cannot compile (CompileUnsupported, a ValueError).
    loras: LoRA files, each a path, 'FILE:SCALE' or a LoraSpec; lora_mode "fused" (added to the
    weights as each part loads: no run-time cost) or "unfused" (strengths can change later through
    `models.loras.set_scale`). Files are read and checked before anything loads (loras.py).
    """
    from flux_core.conditioner import VALID_DTYPES
    from flux_core.runtime import check_compile_support, compile_blocks

    if compile:
        check_compile_support(device)

    check_weights_format(weights, device)
    if residency is None:
        residency = Residency(offload=offload, text_device=text_device, staged=staged)
    elif (offload, text_device, staged) != ("none", None, False):
        raise ValueError("pass either residency= or offload=/text_device=/staged=, not both")
    residency.check(device)
    paths = resolve_paths(model if model is not None else flux_mini_path(), ae, text_encoders)
    chosen = resolve_preset(paths, preset)
    family = family_loaders(chosen)
    dtype = resolve_dtype(dtype, device)
    if dtype not in VALID_DTYPES:  # before anything is loaded: one dtype serves all four parts
        valid = ", ".join(str(d).removeprefix("torch.") for d in VALID_DTYPES)
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} is not supported: the text encoders (T5 "
                         f"overflows in float16) take {valid}")  # fmt: skip
    from .resources import Footprint, check_fits, part_weights, text_layer_weights

    files = open_weights(paths.transformer, "transformer")
    given = chosen if preset else None  # no preset given: the shape is read from the file (pruned files load)
    params = family.check_model(files, given)
    ae_params = family.check_ae(open_weights(paths.ae, "ae"))
    family.check_text(paths.text_encoders, chosen, params)
    loras = loras if isinstance(loras, Loras) else Loras(loras, lora_mode, chosen.family)
    family.check_loras(loras, files)
    n_fp8 = quantized_count(files) if weights == "fp8" else 0
    resident = resident_bytes(part_weights(paths), params, residency, device, dtype, n_fp8,
                              text_layer_weights(paths, chosen.family))  # fmt: skip
    check_fits(Footprint(resident, 0, 0, 0), device, "loading the model")

    def read_flow(where: torch.device) -> torch.nn.Module:
        return family.load_model(paths.transformer, given, where, dtype, weights)

    def load_flow(where: torch.device) -> torch.nn.Module:
        flow = read_flow(where)
        loras.apply("flow", flow)
        if compile:
            compile_blocks(flow)  # in place: a staged reload keeps the compiled blocks
        return flow

    def reload_flow(module: torch.nn.Module, where: torch.device) -> None:
        if weights == "fp8" or loras:  # Fp8Linear / LoRA modules: built as at the first load
            fresh = read_flow(where)
            loras.apply("flow", fresh)
            state = fresh.state_dict()
        else:
            state = open_weights(paths.transformer, "transformer").bfl_tensors(where, dtype)
        module.load_state_dict(state, strict=True, assign=True)

    def reload_ae(module: torch.nn.Module, where: torch.device) -> None:
        module.load_state_dict(open_weights(paths.ae, "ae").bfl_tensors(where, dtype), strict=True, assign=True)

    def load_text(where: torch.device):
        text = family.load_text(paths.text_encoders, chosen, where, dtype)
        loras.apply("text", text)
        return text

    loaders = {
        "flow": load_flow,
        "ae": lambda where: family.load_ae(paths.ae, where, dtype),
        "text": load_text,
    }
    runtime = Runtime(residency, device, loaders, {"flow": reload_flow, "ae": reload_ae})
    if not residency.staged:
        runtime.load_all()
    return FluxModels(runtime, params, ae_params, chosen, paths, torch.device(device), dtype, weights, compile, loras)
