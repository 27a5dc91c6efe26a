"""The `fluxspace` command: generate images, edit them with FluxSpace, sweep edit parameters.

Every argument is checked before any model is loaded, so a typo costs nothing. Without --model the
shipped flux-mini is used.
"""

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

import tomllib

from flux_core import PRESETS, Preset
from flux_core.loading import DTYPES, read_ae_params

from . import mini
from .edit import COARSE_TARGETS, PROJECTIONS, Concept, EditSpec, validate
from .editing import edit_image, mask_overlay
from .images import save_png, side_by_side
from .inversion import FITS, FORWARD_TIMES, SOLVERS, InversionSettings, fit_image, invert_image, read_image
from .pipeline import ModelPaths, SampleSettings, generate, load_models, resolve_paths, resolve_preset
from .sweep import SWEEPABLE, parse_values, sweep, vary


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


def add_edit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("FluxSpace edit")
    g.add_argument(
        "--edit", action="append", default=[], metavar="WORD[:LAMBDA]",
        help="a concept to add (lambda > 0) or remove (lambda < 0); repeat for several (default lambda 5)",
    )  # fmt: skip
    g.add_argument("--edits-file", help="a TOML file with [[concept]] tables and edit settings")
    g.add_argument("--tau", type=float, default=0.5, help="mask threshold tau_m in [0, 1]; 0 = no mask (default 0.5)")
    g.add_argument("--mask-words", nargs="+", help="words of the edit prompt that define its mask (default: all)")
    g.add_argument("--lambda-coarse", type=float, default=0.0, help="coarse (pooled-vector) edit strength")
    g.add_argument("--coarse-prompt", help="prompt of the coarse edit (default: the edit words)")
    g.add_argument("--start", default="0", help="first edited step (int) or time t in [0, 1] (float); default 0")
    g.add_argument("--end", help="first step no longer edited (int) or time t (float); default: the end")
    g.add_argument("--blocks", help="double blocks that edit, e.g. 0-9 or 0,3,5 (default: all)")
    g.add_argument("--prior", default="", help="prior prompt phi (default: empty)")
    g.add_argument("--projection", choices=PROJECTIONS, default="after_proj")
    g.add_argument("--coarse-target", choices=COARSE_TARGETS, default="txt")


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
        help=f"parameter and values; once or twice. NAME in {', '.join(SWEEPABLE)}",
    )  # fmt: skip
    sw.add_argument("--out", default="out/sweep.png", help="output PNG")
    bench = sub.add_parser("bench", help="benchmarks on flux-mini: edit-quality (options: fluxspace bench edit-quality -h)")
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    add_edit_args(sw)
    add_model_args(sw)
    add_sampling_args(sw)
    return parser


def parse_time(name: str, text: str | None) -> int | float | None:
    """'3' -> step 3; '0.75' -> t = 0.75."""
    if text is None:
        return None
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise CLIError(f"--{name} must be a step index (e.g. 2) or a time in [0, 1] (e.g. 0.8); got {text!r}") from None


def parse_concept(text: str, tau: float, mask_words) -> Concept:
    """'eyeglasses' or 'eyeglasses:5' or 'red hair:-3'."""
    word, lam = text, 5.0
    if ":" in text:
        word, _, value = text.rpartition(":")
        try:
            lam = float(value)
        except ValueError:
            raise CLIError(f"--edit {text!r}: the part after ':' must be a number (lambda_fine)") from None
    return Concept(prompt=word.strip(), lambda_fine=lam, tau_m=tau, mask_words=tuple(mask_words) if mask_words else None)


def parse_blocks(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise CLIError(f"--blocks: {part!r} is not an index or a range like 0-9")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out += range(a, b + 1)
    return tuple(out)


EDIT_FILE_KEYS = {"lambda_coarse", "coarse_prompt", "start", "end", "blocks", "prior_prompt", "projection", "coarse_target"}
CONCEPT_KEYS = {"prompt", "lambda_fine", "tau_m", "mask_words"}


def spec_from(args) -> EditSpec:
    """The edit from --edit flags and/or --edits-file (the file's settings win over the flags' defaults)."""
    concepts = [parse_concept(e, args.tau, args.mask_words) for e in args.edit]
    settings = dict(
        lambda_coarse=args.lambda_coarse, coarse_prompt=args.coarse_prompt, start=parse_time("start", args.start),
        end=parse_time("end", args.end), blocks=parse_blocks(args.blocks), prior_prompt=args.prior,
        projection=args.projection, coarse_target=args.coarse_target,
    )  # fmt: skip
    if args.edits_file:
        try:
            data = tomllib.loads(Path(args.edits_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise CLIError(f"--edits-file {args.edits_file}: {e}") from None
        unknown = set(data) - EDIT_FILE_KEYS - {"concept"}
        if unknown:
            raise CLIError(f"--edits-file: unknown keys {sorted(unknown)}; valid: {sorted(EDIT_FILE_KEYS | {'concept'})}")
        for i, c in enumerate(data.get("concept", [])):
            bad = set(c) - CONCEPT_KEYS
            if bad or "prompt" not in c:
                raise CLIError(f"--edits-file: [[concept]] {i} needs 'prompt' and may have {sorted(CONCEPT_KEYS)}")
            concepts.append(Concept(c["prompt"], c.get("lambda_fine", 5.0), c.get("tau_m", args.tau),
                                    tuple(c["mask_words"]) if "mask_words" in c else None))  # fmt: skip
        settings.update({k: tuple(v) if k == "blocks" else v for k, v in data.items() if k != "concept"})
    if not concepts and not settings["coarse_prompt"]:
        raise CLIError("give at least one --edit WORD[:LAMBDA] (or [[concept]] in --edits-file, or --coarse-prompt)")
    return EditSpec(concepts=tuple(concepts), **settings)


def check_spec(spec: EditSpec, settings: SampleSettings, chosen: "Chosen") -> None:
    """Validate the edit against the number of steps; the block range is checked once the model is loaded."""
    steps = settings.steps if settings.steps is not None else chosen.preset.default_steps
    try:
        validate(spec, num_steps=steps, num_double_blocks=10**9)
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


def settings_from(args, chosen: "Chosen") -> SampleSettings:
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
        s.validate(chosen.pixels_per_token)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return s


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


def choose_model(args) -> Chosen:
    """Find the model's files (default: the shipped flux-mini) and read their headers."""
    try:
        model = args.model if args.model else mini.model_path()
        paths = resolve_paths(model, args.ae, args.text_encoders)
        return Chosen(paths, resolve_preset(paths, args.preset), 2 * read_ae_params(paths.ae).downsampling)
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
    s = settings.resolved(models.preset)
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
    settings = settings_from(args, chosen)
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
    settings = settings_from(args, chosen)
    inversion = inversion_from(args)
    (out,) = output_paths(args.out, 1)
    image = _image(args)
    try:
        fit_image(image, chosen.pixels_per_token, args.fit)
    except ValueError as e:
        raise CLIError(str(e)) from None
    models = load_for(args, chosen)
    s = settings.resolved(models.preset)
    cfg = settings.cfg_scale if settings.cfg_scale is not None else 1.0
    r = invert_image(models, image, args.prompt, steps=s.steps, settings=inversion, fit=args.fit, seed=args.seed[0],
                     cfg_scale=cfg, guidance=s.guidance)  # fmt: skip
    params = {"command": "invert", "image_path": str(args.image), "prompt": args.prompt, "steps": s.steps,
              "cfg_scale": cfg, "inversion": dataclasses.asdict(inversion), "fit": args.fit, "psnr_db": r.psnr,
              "evaluations": r.evaluations, "preset": models.preset.name, "model": str(models.paths.transformer)}  # fmt: skip
    print(save_png(r.reconstruction, out, params))
    print(f"reconstruction PSNR {r.psnr:.2f} dB at {r.image.width}x{r.image.height}, {s.steps} steps, "
          f"{r.evaluations} transformer evaluations")  # fmt: skip
    return 0


def run_sweep(args) -> int:
    spec = spec_from(args)
    chosen = choose_model(args)
    settings = settings_from(args, chosen)
    axes = []
    for item in args.vary:
        name, sep, values = item.partition("=")
        if not sep:
            raise CLIError(f"--vary {item!r}: write NAME=V1,V2,... with NAME in {', '.join(SWEEPABLE)}")
        try:
            axes.append((name.strip(), parse_values(name.strip(), values)))
        except ValueError as e:
            raise CLIError(str(e)) from None
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


def run_edit_quality(options: list[str]) -> None:
    from .mini.edit_quality import main as edit_quality

    edit_quality(options)


BENCHMARKS = {"edit-quality": run_edit_quality}


def run_bench(args) -> int:
    BENCHMARKS[args.benchmark](args.options)
    return 0


COMMANDS = {"generate": run_generate, "edit": run_edit, "invert": run_invert, "sweep": run_sweep, "bench": run_bench}


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
