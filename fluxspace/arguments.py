"""The `fluxspace` command's flags, and the objects they describe.

The parser (build_parser), and what the flags build before anything is loaded: the EditSpec (from
--edit flags and/or an edits file; every EditSpec field has a flag, listed in SPEC_ARGS), the
inversion settings and the seeds. The commands themselves are in cli.py; the small text grammars
(WORD:LAMBDA, block ranges, step or time, --vary lists) in grammar.py.
"""

import argparse
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import tomllib
import torch

from flux_core import PRESETS
from flux_core.conditioner import VALID_DTYPES
from flux_core.files import DTYPES
from flux_core.runtime.fp8 import WEIGHTS_FORMATS

from . import grammar
from .inversion import FITS, FORWARD_TIMES, SOLVERS, InversionSettings
from .loras import LORA_MODES, Loras, LoraSpec
from .runtime import OFFLOAD_MODES, Residency
from .settings import MAX_PIXELS
from .spec import COARSE_TARGETS, PRIOR_REMOVALS, PROJECTIONS, Concept, EditSpec


class CLIError(Exception):
    """A bad argument: printed as `fluxspace: error: ...` with exit status 2."""


# One dtype for the whole model: the ones the text encoders take too (T5 overflows in float16).
MODEL_DTYPES = tuple(name for name, dtype in DTYPES.items() if dtype in VALID_DTYPES)
SEED_RANGE = 2**64  # torch.Generator seeds: one seed, one image
MAX_SIDE = math.isqrt(MAX_PIXELS)  # --size: the longest side an image is resized to


def check_device(text: str, flag: str = "--device") -> str:
    """`--device` (or `--text-device`): a device torch knows and this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"{flag} {text!r} is not a device; valid: cpu, cuda, cuda:N, mps")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CLIError(f"{flag} {text}: this machine has no CUDA device (torch {torch.__version__}); use {flag} cpu")
        if device.index is not None and device.index >= count:
            raise CLIError(f"{flag} {text}: this machine has CUDA devices 0..{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"{flag} {text}: MPS is not available on this machine; use {flag} cpu")
    return text


def residency_from(args) -> Residency:
    """--offload, --text-device and --staged, checked against --device (a one-line error if they cannot work)."""
    if args.text_device is not None:
        check_device(args.text_device, "--text-device")
    residency = Residency(offload=args.offload, text_device=args.text_device, staged=args.staged)
    try:
        residency.check(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return residency


def loras_from(args, family: str, unfused: bool = False) -> Loras:
    """--lora FILE[:SCALE] (each read and checked now, for a model of `family`) and --lora-mode; `unfused`
    when strengths will change."""
    try:
        specs = [LoraSpec.parse(text) for text in args.lora]
    except ValueError as e:
        raise CLIError(f"--lora {e}") from None
    for spec in specs:
        if not spec.path.is_file():
            raise CLIError(f"--lora {spec.path}: no such file")
    return Loras(specs, "unfused" if unfused else args.lora_mode, family)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="transformer .safetensors, a folder with it and ae.safetensors, or a diffusers folder "
        "(default: the shipped flux-mini)",
    )
    g.add_argument("--preset", choices=sorted(PRESETS), help="check the file against this preset (default: inferred)")
    g.add_argument("--ae", help="autoencoder file (default: ae.safetensors beside the model)")
    g.add_argument("--text-encoders", help="folder with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ..., mps (default: cpu)")
    g.add_argument("--dtype", choices=MODEL_DTYPES, help="default: bfloat16 on a GPU, float32 on the CPU")
    g.add_argument(
        "--weights", choices=WEIGHTS_FORMATS, default="full",
        help="full: every weight in --dtype; fp8: the transformer's block Linear weights as float8 e4m3fn with a "
        "per-tensor scale, computed in --dtype (half the bytes of bf16; not on MPS) (default: full)",
    )  # fmt: skip
    g.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                   help="none: every part stays on the device (default); model: T5, CLIP, the transformer and the "
                   "AE each on the device only while it runs; blocks: also the transformer's blocks streamed to "
                   "the GPU in groups (CUDA only)")  # fmt: skip
    g.add_argument("--text-device", help="where T5 and CLIP run, e.g. cpu beside --device cuda (default: --device)")
    g.add_argument("--staged", action="store_true", help="load each part when first used and free it when the next "
                   "runs: peak memory of the largest part, not of all; parts are read again for each run")  # fmt: skip
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block once (regional): "
                   "the first step takes seconds longer, later steps are faster; needs torch >= 2.5 and a "
                   "compiler (triton on CUDA, a C++ compiler on the CPU)")  # fmt: skip
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA .safetensors (diffusers/PEFT, kohya, official or XLabs keys) at strength SCALE "
                   "(default 1); repeat for several")  # fmt: skip
    g.add_argument("--lora-mode", choices=LORA_MODES, default="fused",
                   help="fused: added into the weights at load (no run-time cost, default); unfused: kept as "
                   "low-rank modules whose strength can change (sweep --vary lora_scale uses it)")  # fmt: skip
    g.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too "
                   "(or set FLUXSPACE_DEBUG=1)")  # fmt: skip


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--width", type=int, help="pixels, a multiple of 16 (8 for flux-mini); default: the preset's (64 for flux-mini, 1024 for FLUX.1)")
    g.add_argument("--height", type=int, help="pixels, a multiple of 16 (8 for flux-mini); default: the preset's")
    g.add_argument("--steps", type=int, help="Euler steps (default: the preset's)")
    g.add_argument("--guidance", type=float, help="distilled guidance of dev models (default: the preset's)")
    g.add_argument("--cfg-scale", type=float, help="true classifier-free guidance scale (1 = off; default: the preset's for models without distilled guidance, else 1)")
    g.add_argument("--negative-prompt", default="", help="negative prompt for true CFG (default: empty)")
    g.add_argument("--parity", action="store_true", help="round like the official code (bf16 Euler updates)")
    g.add_argument("--seed", type=int, nargs="+", default=[0], help="one seed, or one per image of the batch")
    g.add_argument("--batch", type=int, default=None, help="images per prompt (default: number of seeds)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


@dataclasses.dataclass(frozen=True)
class SpecArg:
    """How one EditSpec field is set: its flag, and the parser its text goes through (flag and edits file)."""

    flag: str
    help: str
    parse: Callable[[str], object] = str
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a bare flag that sets True
    kind: str = "text"  # what the edits file may hold: a key of FILE_TYPES


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# The TOML value types of the edits file, by kind: (what the message calls it, test).
FILE_TYPES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "text": ("a string", lambda v: isinstance(v, str)),
    "number": ("a number", _number),
    "step or time": ("an integer step or a time in [0, 1]", _number),
    "blocks": ("a list of block indices or a range string like \"0-9\"",
               lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in v))),  # fmt: skip
    "switch": ("true or false", lambda v: isinstance(v, bool)),
    "words": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(w, str) for w in v)),
}


# Every field of EditSpec, by name: the edits file uses the field names as keys, the flags are listed
# here. build_parser refuses to run if a field has no entry, so a new option cannot miss the CLI.
SPEC_ARGS: dict[str, SpecArg] = {
    "lambda_coarse": SpecArg("--lambda-coarse", "coarse (pooled-vector) edit strength (default 0)", float, kind="number"),
    "coarse_prompt": SpecArg("--coarse-prompt", "prompt of the coarse edit (default: the edit words)"),
    "start": SpecArg("--start", "first edited step (int) or time t in [0, 1] (float); default 0",
                     lambda text: grammar.step_or_time("start", text), kind="step or time"),  # fmt: skip
    "end": SpecArg("--end", "first step no longer edited (int) or time t (float); default: the end",
                   lambda text: grammar.step_or_time("end", text), kind="step or time"),  # fmt: skip
    "blocks": SpecArg("--blocks", "double blocks that edit, e.g. 0-9 or 0,3,5 (default: all)", grammar.blocks,
                      kind="blocks"),  # fmt: skip
    "prior_prompt": SpecArg("--prior", "prior prompt phi (default: empty)"),
    "projection": SpecArg("--projection", "project the direction after the output projection (default) or before it",
                          choices=PROJECTIONS),  # fmt: skip
    "coarse_target": SpecArg("--coarse-target", "which modulation the coarse vector drives (default: txt)",
                             choices=COARSE_TARGETS),  # fmt: skip
    "prior_removal": SpecArg("--prior-removal", "how the prior is removed from the edit direction: the paper's "
                             "orthogonal component (default), a plain difference, or none (ablations)",
                             choices=PRIOR_REMOVALS),  # fmt: skip
    "reference": SpecArg("--reference", "reproduce the unofficial implementation exactly "
                         "(docs/fluxspace_reference_notes.md)", switch=True, kind="switch"),  # fmt: skip
    "edit_condition": SpecArg("--edit-condition", "Kontext models: edit the conditioning image's tokens too "
                              "(default: only the generated image's)", switch=True, kind="switch"),  # fmt: skip
}
# Concepts come from --edit WORD[:LAMBDA] (prompt, lambda_fine), --tau and --mask-words, or from
# [[concept]] tables of the edits file whose keys are Concept's field names.
CONCEPT_FLAGS = {"prompt": "--edit", "lambda_fine": "--edit", "tau_m": "--tau", "mask_words": "--mask-words"}
CONCEPT_KINDS = {"prompt": "text", "lambda_fine": "number", "tau_m": "number", "mask_words": "words"}


def _check_flag_tables() -> None:
    fields = {f.name for f in dataclasses.fields(EditSpec)} - {"concepts"}
    concept_fields = {f.name for f in dataclasses.fields(Concept)}
    if set(SPEC_ARGS) != fields or not set(CONCEPT_FLAGS) == set(CONCEPT_KINDS) == concept_fields:
        raise RuntimeError(
            f"the CLI does not cover the edit's fields: EditSpec {sorted(fields ^ set(SPEC_ARGS))}, "
            f"Concept {sorted(concept_fields ^ set(CONCEPT_FLAGS))}"
        )


def add_edit_args(p: argparse.ArgumentParser) -> None:
    _check_flag_tables()
    g = p.add_argument_group("FluxSpace edit")
    g.add_argument(
        "--edit", action="append", default=[], metavar="WORD[:LAMBDA]",
        help="a concept to add (lambda > 0) or remove (lambda < 0); repeat for several (default lambda 5)",
    )  # fmt: skip
    g.add_argument("--edits-file", help="a TOML file: EditSpec's fields as keys and [[concept]] tables; flags given "
                   "on the command line win over it")  # fmt: skip
    g.add_argument("--tau", type=float, help="mask threshold tau_m in [0, 1]; 0 = no mask (default 0.5)")
    g.add_argument("--mask-words", nargs="+", help="words of the edit prompt that define its mask (default: all)")
    for name, arg in SPEC_ARGS.items():
        if arg.switch:
            g.add_argument(arg.flag, dest=name, action="store_true", default=None, help=arg.help)
        else:
            g.add_argument(arg.flag, dest=name, choices=arg.choices, help=arg.help)


def add_image_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("real image (inversion)")
    if required:
        g.add_argument("image", help="the image to invert (PNG, JPEG, ...)")
    else:
        g.add_argument("--image", action="append", help="edit this image instead of a generated one: it is inverted "
                       "first, or, on a Kontext model, it is the image the instruction edits (no inversion); on "
                       "FLUX.2, a reference image (repeat for several)")  # fmt: skip
    g.add_argument("--fit", choices=FITS, default="resize",
                   help="make the sides multiples of the token size by resizing (default) or centre-cropping")  # fmt: skip
    g.add_argument("--size", type=int, help="resize the longer side to this many pixels first")
    g.add_argument("--solver", choices=SOLVERS, default="euler", help="inversion/sampling solver (default: euler)")
    g.add_argument("--fireflow", action="store_true", help="midpoint solver reusing the previous midpoint velocity")
    g.add_argument("--gamma", type=float, default=0.0, help="RF-Inversion forward control in [0, 1] (0: off)")
    g.add_argument("--eta", type=float, default=0.0, help="RF-Inversion reverse control in [0, 1] (0: off)")
    g.add_argument("--eta-start", type=float, default=0.0, help="reverse control from this share of the steps")
    g.add_argument("--eta-stop", type=float, default=0.25, help="reverse control until this share of the steps")
    g.add_argument("--forward-time", choices=FORWARD_TIMES, default="schedule",
                   help="time fed to the model in the forward pass: the schedule's (default) or linear i/N")  # fmt: skip


def inversion_from(args) -> InversionSettings:
    solver = "midpoint" if args.fireflow else args.solver
    s = InversionSettings(solver=solver, reuse=args.fireflow, gamma=args.gamma, eta=args.eta, eta_start=args.eta_start,
                          eta_stop=args.eta_stop, forward_time=args.forward_time)  # fmt: skip
    try:
        s.validate()
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.size is not None and not 1 <= args.size <= MAX_SIDE:
        raise CLIError(f"--size must be in [1, {MAX_SIDE}] (pixels of the longer side); got {args.size}")
    return s


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage is one -h away), as every other error here."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fluxspace", description="generate images, edit them with FluxSpace, sweep edit parameters, "
        "edit interactively in the browser (app)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("prompt", nargs="+", help="one or more prompts (quote each); on a Kontext model, instructions")
    gen.add_argument("--out", default="out/generate.png", help="output PNG (several images: NAME-K.png)")
    gen.add_argument("--image", action="append", help="Kontext models: the image to edit by the prompt's "
                     "instruction; FLUX.2: a reference image (repeat for several)")  # fmt: skip
    add_model_args(gen)
    add_sampling_args(gen)

    ed = sub.add_parser("edit", help="FluxSpace edit: unedited and edited image from one noise, and masks")
    ed.add_argument("prompt", nargs="?", help="the base prompt (on a Kontext model: the instruction)")
    ed.add_argument("--instruction", help="Kontext models: the instruction, e.g. 'add a hat' (same as the prompt)")
    ed.add_argument("--out-dir", default="out/edit", help="folder for original/edited/side_by_side/mask PNGs")
    add_edit_args(ed)
    add_image_args(ed)
    add_model_args(ed)
    add_sampling_args(ed)

    inv = sub.add_parser("invert", help="invert an image and reconstruct it; prints the reconstruction PSNR")
    add_image_args(inv, required=True)
    inv.add_argument("--prompt", default="", help="text the passes condition on, e.g. a caption (default: empty)")
    inv.add_argument("--out", default="out/reconstruction.png", help="output PNG (the reconstruction)")
    add_model_args(inv)
    add_sampling_args(inv)

    sw = sub.add_parser("sweep", help="a labelled grid over one or two edit parameters, from one noise")
    sw.add_argument("prompt", help="the base prompt (on a Kontext model: the instruction)")
    sw.add_argument("--image", action="append", help="Kontext models: the image the instruction edits; FLUX.2: a "
                    "reference image (repeat for several)")  # fmt: skip
    sw.add_argument(
        "--vary", action="append", required=True, metavar="NAME=V1,V2,...",
        help=f"parameter and values; once or twice. NAME in {', '.join(grammar.SWEEPABLE)}",
    )  # fmt: skip
    sw.add_argument("--out", default="out/sweep.png", help="output PNG")
    add_edit_args(sw)
    add_model_args(sw)
    add_sampling_args(sw)

    app = sub.add_parser("app", help="the interactive editor in the browser (needs the app extra: "
                         "pip install 'fluxspace[app]')")  # fmt: skip
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                     "only; 0.0.0.0 serves every network the machine is on)")  # fmt: skip
    app.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    add_model_args(app)
    return parser


def _parsed(name: str, value):
    """An EditSpec field's value from a flag's text or an edits file's TOML value."""
    if name == "blocks" and isinstance(value, list):
        return tuple(value)
    if isinstance(value, str) and SPEC_ARGS[name].parse is not str:
        return SPEC_ARGS[name].parse(value)
    return value


def _edits_file(path: str, tau: float) -> tuple[list[Concept], dict]:
    """Concepts and settings of an edits file; keys are EditSpec's and Concept's field names."""
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise CLIError(f"--edits-file {path}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CLIError(f"--edits-file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                       "TOML files are UTF-8") from None  # fmt: skip
    except tomllib.TOMLDecodeError as e:
        raise CLIError(f"--edits-file {path} is not valid TOML: {e}") from None
    unknown = set(data) - set(SPEC_ARGS) - {"concept"}
    if unknown:
        raise CLIError(f"--edits-file: unknown keys {sorted(unknown)}; valid: {sorted(set(SPEC_ARGS) | {'concept'})}")
    for name, value in data.items():
        if name != "concept":
            _check_type(path, name, value, SPEC_ARGS[name].kind)
    concepts = []
    tables = data.pop("concept", [])
    if not isinstance(tables, list) or not all(isinstance(c, dict) for c in tables):
        raise CLIError(f"--edits-file {path}: 'concept' must be [[concept]] tables (each with prompt = \"...\")")
    for i, c in enumerate(tables):
        if set(c) - set(CONCEPT_FLAGS) or "prompt" not in c:
            raise CLIError(f"--edits-file: [[concept]] {i} needs 'prompt' and may have {sorted(CONCEPT_FLAGS)}")
        for name, value in c.items():
            _check_type(path, f"[[concept]] {i} {name}", value, CONCEPT_KINDS[name])
        mask_words = tuple(c["mask_words"]) if "mask_words" in c else None
        concepts.append(Concept(**{"tau_m": tau, **c, "mask_words": mask_words}))
    try:
        return concepts, {name: _parsed(name, value) for name, value in data.items()}
    except ValueError as e:
        raise CLIError(f"--edits-file {path}: {e}") from None


def _check_type(path: str, key: str, value, kind: str) -> None:
    what, ok = FILE_TYPES[kind]
    if not ok(value):
        raise CLIError(f"--edits-file {path}: {key} must be {what}; got {value!r}")


def spec_from(args) -> EditSpec:
    """The edit from the --edit flags and/or --edits-file; a flag given on the command line wins over the file."""
    tau = args.tau if args.tau is not None else Concept.__dataclass_fields__["tau_m"].default
    concepts, settings = _edits_file(args.edits_file, tau) if args.edits_file else ([], {})
    concepts = [grammar.concept(e, tau, args.mask_words) for e in args.edit] + concepts
    for name in SPEC_ARGS:
        if getattr(args, name) is not None:
            settings[name] = _parsed(name, getattr(args, name))
    if not concepts and not settings.get("coarse_prompt"):
        raise CLIError("give at least one --edit WORD[:LAMBDA] (or [[concept]] in --edits-file, or --coarse-prompt)")
    return EditSpec(concepts=tuple(concepts), **settings)



def seeds_for(args) -> list[int]:
    """`--seed S --batch N` -> S, S+1, ...; several seeds -> those seeds. Each in [0, 2^64)."""
    batch = args.batch if args.batch is not None else len(args.seed)
    if batch < 1:
        raise CLIError(f"--batch must be >= 1; got {batch}")
    if len(args.seed) == 1:
        seeds = [args.seed[0] + i for i in range(batch)]
    elif len(args.seed) != batch:
        raise CLIError(f"--batch {batch} needs 1 or {batch} seeds; got {len(args.seed)}")
    else:
        seeds = list(args.seed)
    bad = [seed for seed in seeds if not 0 <= seed < SEED_RANGE]
    if bad:
        raise CLIError(f"--seed {bad[0]} is out of range: seeds are integers in [0, 2^64 - 1 = {SEED_RANGE - 1}]")
    return seeds
