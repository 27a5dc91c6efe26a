"""The `fluxspace` command: generate images (and, in later subcommands, edit them).

Every argument is checked before any model is loaded, so a typo costs nothing.
"""

import argparse
import sys
import time
from pathlib import Path

from flux_core import PRESETS
from flux_core.loading import DTYPES

from .images import save_png
from .pipeline import SampleSettings, generate, load_models, resolve_paths


class CLIError(Exception):
    """A bad argument: printed as `fluxspace: error: ...` with exit status 2."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="transformer .safetensors, a folder with it and ae.safetensors, or a diffusers folder")
    g.add_argument("--preset", choices=sorted(PRESETS), help="check the file against this preset (default: inferred)")
    g.add_argument("--ae", help="autoencoder file (default: ae.safetensors beside the model)")
    g.add_argument("--text-encoders", help="folder with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--width", type=int, default=512, help="pixels, a multiple of 16 (default: 512)")
    g.add_argument("--height", type=int, default=512, help="pixels, a multiple of 16 (default: 512)")
    g.add_argument("--steps", type=int, help="Euler steps (default: the preset's)")
    g.add_argument("--guidance", type=float, help="distilled guidance of dev models (default: the preset's)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="true classifier-free guidance scale (1 = off)")
    g.add_argument("--negative-prompt", default="", help="negative prompt for true CFG (default: empty)")
    g.add_argument("--parity", action="store_true", help="round like the official code (bf16 Euler updates)")
    g.add_argument("--seed", type=int, nargs="+", default=[0], help="one seed, or one per image of the batch")
    g.add_argument("--batch", type=int, default=None, help="images per prompt (default: number of seeds)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxspace", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    gen.add_argument("--out", default="out/generate.png", help="output PNG (several images: NAME-K.png)")
    add_model_args(gen)
    add_sampling_args(gen)
    return parser


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


def settings_from(args) -> SampleSettings:
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
        s.validate()
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


def require_model(args) -> str:
    if not args.model:
        raise CLIError("no model given: pass --model (a transformer .safetensors file or a model folder)")
    try:
        resolve_paths(args.model, args.ae, args.text_encoders)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    return args.model


def run_generate(args) -> int:
    # Validate everything first: nothing is loaded or written before the arguments are known good.
    settings = settings_from(args)
    seeds = seeds_for(args)
    prompts = [p for p in args.prompt for _ in seeds]
    all_seeds = seeds * len(args.prompt)
    paths = output_paths(args.out, len(prompts))
    model = require_model(args)

    t0 = time.perf_counter()
    models = load_models(
        model, preset=args.preset, ae=args.ae, text_encoders=args.text_encoders, device=args.device, dtype=args.dtype
    )
    print(f"loaded {models.preset.name}-shaped model from {model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
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


COMMANDS = {"generate": run_generate}


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
