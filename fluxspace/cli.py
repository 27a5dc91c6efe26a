"""The `fluxspace` command: generate images, edit them with FluxSpace, sweep edit parameters.

Every argument is checked before any model is loaded, so a typo costs nothing. Without --model the
shipped flux-mini is used.
"""

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tomllib

from flux_core import PRESETS, Preset
from flux_core.loading import DTYPES, read_ae_params, read_flux_params

from . import grammar
from .editing import edit_image, mask_overlay
from .images import save_png, side_by_side
from .inversion import FITS, FORWARD_TIMES, SOLVERS, InversionSettings, fit_image, invert_image, read_image
from .models import ModelPaths, flux_mini_path, load_models, resolve_paths, resolve_preset
from .run import generate
from .settings import SampleSettings
from .spec import COARSE_TARGETS, PRIOR_REMOVALS, PROJECTIONS, Concept, EditSpec, validate
from .sweep import sweep, vary


class CLIError(Exception):
    """A bad argument: printed as `fluxspace: error: ...` with exit status 2."""


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
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")


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


# Every field of EditSpec, by name: the edits file uses the field names as keys, the flags are listed
# here. build_parser refuses to run if a field has no entry, so a new option cannot miss the CLI.
SPEC_ARGS: dict[str, SpecArg] = {
    "lambda_coarse": SpecArg("--lambda-coarse", "coarse (pooled-vector) edit strength (default 0)", float),
    "coarse_prompt": SpecArg("--coarse-prompt", "prompt of the coarse edit (default: the edit words)"),
    "start": SpecArg("--start", "first edited step (int) or time t in [0, 1] (float); default 0",
                     lambda text: grammar.step_or_time("start", text)),  # fmt: skip
    "end": SpecArg("--end", "first step no longer edited (int) or time t (float); default: the end",
                   lambda text: grammar.step_or_time("end", text)),  # fmt: skip
    "blocks": SpecArg("--blocks", "double blocks that edit, e.g. 0-9 or 0,3,5 (default: all)", grammar.blocks),
    "prior_prompt": SpecArg("--prior", "prior prompt phi (default: empty)"),
    "projection": SpecArg("--projection", "project the direction after the output projection (default) or before it",
                          choices=PROJECTIONS),  # fmt: skip
    "coarse_target": SpecArg("--coarse-target", "which modulation the coarse vector drives (default: txt)",
                             choices=COARSE_TARGETS),  # fmt: skip
    "prior_removal": SpecArg("--prior-removal", "how the prior is removed from the edit direction: the paper's "
                             "orthogonal component (default), a plain difference, or none (ablations)",
                             choices=PRIOR_REMOVALS),  # fmt: skip
    "reference": SpecArg("--reference", "reproduce the unofficial implementation exactly "
                         "(docs/fluxspace_reference_notes.md)", switch=True),  # fmt: skip
}
# Concepts come from --edit WORD[:LAMBDA] (prompt, lambda_fine), --tau and --mask-words, or from
# [[concept]] tables of the edits file whose keys are Concept's field names.
CONCEPT_FLAGS = {"prompt": "--edit", "lambda_fine": "--edit", "tau_m": "--tau", "mask_words": "--mask-words"}


def _check_flag_tables() -> None:
    fields = {f.name for f in dataclasses.fields(EditSpec)} - {"concepts"}
    concept_fields = {f.name for f in dataclasses.fields(Concept)}
    if set(SPEC_ARGS) != fields or set(CONCEPT_FLAGS) != concept_fields:
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
        g.add_argument("--image", help="edit this image instead of a generated one (it is inverted first)")
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
    if args.size is not None and args.size < 1:
        raise CLIError(f"--size must be >= 1; got {args.size}")
    return s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxspace", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    gen.add_argument("--out", default="out/generate.png", help="output PNG (several images: NAME-K.png)")
    add_model_args(gen)
    add_sampling_args(gen)

    ed = sub.add_parser("edit", help="FluxSpace edit: unedited and edited image from one noise, and masks")
    ed.add_argument("prompt", help="the base prompt")
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
    sw.add_argument("prompt", help="the base prompt")
    sw.add_argument(
        "--vary", action="append", required=True, metavar="NAME=V1,V2,...",
        help=f"parameter and values; once or twice. NAME in {', '.join(grammar.SWEEPABLE)}",
    )  # fmt: skip
    sw.add_argument("--out", default="out/sweep.png", help="output PNG")
    add_edit_args(sw)
    add_model_args(sw)
    add_sampling_args(sw)
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
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CLIError(f"--edits-file {path}: {e}") from None
    unknown = set(data) - set(SPEC_ARGS) - {"concept"}
    if unknown:
        raise CLIError(f"--edits-file: unknown keys {sorted(unknown)}; valid: {sorted(set(SPEC_ARGS) | {'concept'})}")
    concepts = []
    tables = data.pop("concept", [])
    if not isinstance(tables, list) or not all(isinstance(c, dict) for c in tables):
        raise CLIError("--edits-file: 'concept' must be a list of [[concept]] tables")
    for i, c in enumerate(tables):
        if set(c) - set(CONCEPT_FLAGS) or "prompt" not in c:
            raise CLIError(f"--edits-file: [[concept]] {i} needs 'prompt' and may have {sorted(CONCEPT_FLAGS)}")
        mask_words = tuple(c["mask_words"]) if "mask_words" in c else None
        concepts.append(Concept(**{"tau_m": tau, **c, "mask_words": mask_words}))
    return concepts, {name: _parsed(name, value) for name, value in data.items()}


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


def check_spec(spec: EditSpec, settings: SampleSettings, chosen: "Chosen") -> None:
    """Validate the edit against the run's steps and the model's double blocks (read from the file header)."""
    try:
        validate(spec, num_steps=settings.steps, num_double_blocks=chosen.depth)
    except ValueError as e:
        raise CLIError(str(e)) from None


def edit_params(result, models) -> dict:
    s = result.settings
    return {
        "command": "edit", "prompt": result.prompt, "seed": result.seed, "width": s.width, "height": s.height,
        "steps": s.steps, "guidance": s.guidance, "cfg_scale": s.cfg_scale, "negative_prompt": s.negative_prompt,
        "parity": s.parity, "preset": models.preset.name, "model": str(models.paths.transformer),
        "edit": dataclasses.asdict(result.spec),
    }  # fmt: skip


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower() or "concept"


def seeds_for(args) -> list[int]:
    """`--seed S --batch N` -> S, S+1, ...; several seeds -> those seeds."""
    batch = args.batch if args.batch is not None else len(args.seed)
    if batch < 1:
        raise CLIError(f"--batch must be >= 1; got {batch}")
    if len(args.seed) == 1:
        return [args.seed[0] + i for i in range(batch)]
    if len(args.seed) != batch:
        raise CLIError(f"--batch {batch} needs 1 or {batch} seeds; got {len(args.seed)}")
    return list(args.seed)


def settings_from(args, chosen: "Chosen", *, real_image: bool = False) -> SampleSettings:
    """The sampling settings of the command, resolved with the model's defaults and checked."""
    s = SampleSettings(
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        cfg_scale=args.cfg_scale,
        negative_prompt=args.negative_prompt,
        parity=args.parity,
    )
    try:
        return s.resolve(chosen.preset, chosen.pixels_per_token, real_image=real_image)
    except ValueError as e:
        raise CLIError(str(e)) from None


def output_paths(out: str, n: int) -> list[Path]:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png path; got {out}")
    if out.exists() and out.is_dir():
        raise CLIError(f"--out {out} is a folder; give a file name ending in .png")
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(n)]


@dataclasses.dataclass(frozen=True)
class Chosen:
    """What the files' headers say about the model, before anything is loaded."""

    paths: ModelPaths
    preset: Preset
    pixels_per_token: int  # image pixels a token covers: sizes must be multiples of it
    depth: int  # double blocks of the transformer: the range an edit's blocks must fall in


def choose_model(args) -> Chosen:
    """Find the model's files (default: the shipped flux-mini) and read their headers."""
    try:
        model = args.model if args.model else flux_mini_path()
        paths = resolve_paths(model, args.ae, args.text_encoders)
        preset = resolve_preset(paths, args.preset)
        depth = read_flux_params(paths.transformer).depth
        return Chosen(paths, preset, 2 * read_ae_params(paths.ae).downsampling, depth)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None


def run_generate(args) -> int:
    # Validate everything first: nothing is loaded or written before the arguments are known good.
    seeds = seeds_for(args)
    prompts = [p for p in args.prompt for _ in seeds]
    all_seeds = seeds * len(args.prompt)
    paths = output_paths(args.out, len(prompts))
    chosen = choose_model(args)
    settings = settings_from(args, chosen)
    models = load_for(args, chosen)
    s = settings
    images = []
    for i in range(0, len(prompts), len(seeds)):
        images += generate(models, prompts[i : i + len(seeds)], all_seeds[i : i + len(seeds)], s, progress=not args.quiet)
    for image, path, prompt, seed in zip(images, paths, prompts, all_seeds, strict=True):
        params = {
            "command": "generate",
            "prompt": prompt,
            "seed": seed,
            "width": s.width,
            "height": s.height,
            "steps": s.steps,
            "guidance": s.guidance,
            "cfg_scale": s.cfg_scale,
            "negative_prompt": s.negative_prompt,
            "parity": s.parity,
            "preset": models.preset.name,
            "model": str(models.paths.transformer),
            "dtype": str(models.dtype).removeprefix("torch."),
        }
        save_png(image, path, params)
        print(path)
    return 0


def load_for(args, chosen: Chosen):
    if getattr(args, "quiet", False):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its "Loading weights" bars too: --quiet means no bars
    t0 = time.perf_counter()
    p = chosen.paths
    models = load_models(
        p.transformer, preset=args.preset, ae=p.ae, text_encoders=p.text_encoders, device=args.device, dtype=args.dtype
    )
    took = time.perf_counter() - t0
    print(f"loaded {models.preset.name}-shaped model from {p.transformer} in {took:.1f} s", file=sys.stderr)
    return models


def run_edit(args) -> int:
    spec = spec_from(args)
    chosen = choose_model(args)
    settings = settings_from(args, chosen, real_image=args.image is not None)
    check_spec(spec, settings, chosen)
    if len(args.seed) != 1:
        raise CLIError("edit takes one --seed")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out-dir {out} exists and is not a folder")
    inversion = inversion_from(args) if args.image else None
    image = _image(args) if args.image else None
    models = load_for(args, chosen)
    result = edit_image(models, args.prompt, spec, seed=args.seed[0], settings=settings, progress=not args.quiet,
                        image=image, inversion=inversion, fit=args.fit)  # fmt: skip
    params = edit_params(result, models)
    if image is not None:
        params |= {"image_path": str(args.image), "inversion": dataclasses.asdict(inversion), "fit": args.fit}
    written = [
        save_png(result.original, out / "original.png", {**params, "image": "original"}),
        save_png(result.edited, out / "edited.png", {**params, "image": "edited"}),
        save_png(side_by_side([result.original, result.edited]), out / "side_by_side.png", {**params, "image": "side_by_side"}),
    ]
    for concept, mask in zip(spec.concepts, result.masks, strict=True):
        overlay = mask_overlay(result.original, mask)
        written.append(save_png(overlay, out / f"mask-{slug(concept.prompt)}.png", {**params, "image": f"mask {concept.prompt}"}))
    for path in written:
        print(path)
    return 0


def _image(args):
    """The image, read and fitted before any model is loaded (errors name the file and the problem)."""
    try:
        image = read_image(args.image)
        if args.size:
            image = fit_image(image, 1, "resize", args.size)
        return image
    except ValueError as e:
        raise CLIError(str(e)) from None


def run_invert(args) -> int:
    chosen = choose_model(args)
    settings = settings_from(args, chosen, real_image=True)
    inversion = inversion_from(args)
    (out,) = output_paths(args.out, 1)
    image = _image(args)
    try:
        fit_image(image, chosen.pixels_per_token, args.fit)
    except ValueError as e:
        raise CLIError(str(e)) from None
    models = load_for(args, chosen)
    r = invert_image(models, image, args.prompt, settings=settings, inversion=inversion, fit=args.fit, seed=args.seed[0])
    s = r.settings
    params = {"command": "invert", "image_path": str(args.image), "prompt": args.prompt, "steps": s.steps,
              "cfg_scale": s.cfg_scale, "inversion": dataclasses.asdict(inversion), "fit": args.fit, "psnr_db": r.psnr,
              "evaluations": r.evaluations, "preset": models.preset.name, "model": str(models.paths.transformer)}  # fmt: skip
    print(save_png(r.reconstruction, out, params))
    print(f"reconstruction PSNR {r.psnr:.2f} dB at {r.image.width}x{r.image.height}, {s.steps} steps, "
          f"{r.evaluations} transformer evaluations")  # fmt: skip
    return 0


def run_sweep(args) -> int:
    spec = spec_from(args)
    chosen = choose_model(args)
    settings = settings_from(args, chosen)
    axes = [grammar.vary(item) for item in args.vary]
    if len(axes) > 2:
        raise CLIError(f"--vary at most twice; got {len(axes)}")
    for name, values in axes:
        for v in values:
            check_spec(vary(spec, name, v), settings, chosen)
    if len(args.seed) != 1:
        raise CLIError("sweep takes one --seed")
    (out,) = output_paths(args.out, 1)
    models = load_for(args, chosen)
    shards = out.with_name(out.name + ".shards")  # used under torchrun only (fluxspace/distributed.py)
    grid, results = sweep(
        models, args.prompt, spec, axes, seed=args.seed[0], settings=settings, progress=not args.quiet, shards=shards
    )
    if grid is None:  # a rank other than 0 of a sharded sweep: its cells are in the shard folder
        return 0
    params = {**edit_params(results[0][0], models), "command": "sweep", "vary": {n: v for n, v in axes}}
    print(save_png(grid, out, params))
    return 0


COMMANDS = {"generate": run_generate, "edit": run_edit, "invert": run_invert, "sweep": run_sweep}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CLIError as e:
        parser.exit(2, f"fluxspace: error: {e}\n")
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"fluxspace: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
