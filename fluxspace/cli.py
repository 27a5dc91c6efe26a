"""The `fluxspace` command: generate images, edit them with FluxSpace, sweep edit parameters.

Every argument is checked before any model is loaded, so a typo costs nothing. Without --model the
shipped flux-mini is used.
"""

import dataclasses
import re
import sys
import time
from pathlib import Path

from flux_core import Preset
from flux_core.loading import read_ae_params, read_flux_params

from . import grammar
from .arguments import CLIError, build_parser, inversion_from, seeds_for, spec_from
from .editing import edit_image, mask_overlay
from .images import save_png, side_by_side
from .inversion import fit_image, invert_image, read_image
from .models import ModelPaths, flux_mini_path, load_models, resolve_paths, resolve_preset
from .run import generate
from .settings import SampleSettings
from .spec import EditSpec, validate
from .sweep import sweep, vary


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
