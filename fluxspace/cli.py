"""The `fluxspace` command: generate images, edit them with FluxSpace, sweep edit parameters, and
serve the interactive editor (`app`, fluxspace/app/).

Every argument, output path and the run's memory are checked before any model is loaded, so a typo
costs nothing; a command's images are written as a set, all or none (flux_core.atomic.FileSet), and
SIGTERM is handled like Ctrl-C. Errors are one line (`fluxspace: error: ...`, exit status 2); --debug
or FLUXSPACE_DEBUG=1 adds the traceback. Without --model the shipped flux-mini is used.
"""

import dataclasses
import os
import re
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from flux_core import FluxParams
from flux_core.atomic import FileSet
from flux_core.autoencoder import AutoEncoderParams
from flux_core.files import open_weights
from flux_core.loading import resolve_dtype
from flux_core.presets import AnyPreset
from flux_core.runtime import check_compile_support
from flux_core.runtime.fp8 import check_weights_format, quantized_count

from . import grammar
from .arguments import (
    CLIError,
    build_parser,
    check_device,
    inversion_from,
    loras_from,
    residency_from,
    seeds_for,
    spec_from,
)
from .editing import edit_image, mask_overlay
from .flux2 import read_references
from .images import save_png, side_by_side
from .inversion import NO_FLUX2_INVERSION, fit_image, invert_image, read_image
from .kontext import fit_condition
from .loras import Loras
from .metadata import run_metadata
from .models import (
    ModelPaths,
    family_loaders,
    flux_mini_path,
    load_models,
    resolve_paths,
    resolve_preset,
    text_length,
)
from .resources import check_fits, footprint, part_weights, text_layer_weights
from .run import generate
from .runtime import Residency, resident_bytes
from .settings import SampleSettings
from .spec import EditSpec, validate
from .sweep import sweep, vary


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that open temporary files are removed on the way out."""


def check_spec(spec: EditSpec, settings: SampleSettings, chosen: "Chosen") -> None:
    """Validate the edit against the run's steps and the model's double blocks (read from the file header)."""
    try:
        validate(spec, num_steps=settings.steps, num_double_blocks=chosen.depth,
                 pooled_text=chosen.preset.family == "flux1")  # FLUX.2: no coarse edit
    except ValueError as e:
        raise CLIError(str(e)) from None


def edit_params(result, models, command: str = "edit") -> dict:
    return run_metadata(command, models, result.settings, prompt=result.prompt, seed=result.seed,
                        edit=dataclasses.asdict(result.spec))  # fmt: skip


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower() or "concept"


def mask_names(spec: EditSpec) -> list[str]:
    """mask-<concept>.png per concept; a name taken by an earlier concept gets -2, -3, ..."""
    names: list[str] = []
    for concept in spec.concepts:
        base, k = f"mask-{slug(concept.prompt)}", 1
        while (name := f"{base}{'' if k == 1 else f'-{k}'}.png") in names:
            k += 1
        names.append(name)
    return names


def check_writable(paths: list[Path]) -> None:
    """Refuse, before any work, output paths that cannot be written: a folder in the way, a file
    where a folder must be, or a place this process may not create files in."""
    for path in paths:
        if path.is_dir():
            raise CLIError(f"cannot write {path}: a folder of that name is in the way")
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CLIError(f"cannot write {path}: {ancestor} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=ancestor):
                pass
        except OSError as e:
            raise CLIError(f"cannot write {path}: {e.strerror or e} in {ancestor}") from None

def settings_from(args, chosen: "Chosen", *, real_image: bool = False, size: tuple[int, int] | None = None) -> SampleSettings:
    """The sampling settings of the command, resolved with the model's defaults and checked.
    size: (width, height) where --width / --height are not given (a Kontext image's fitted size)."""
    s = SampleSettings(
        width=args.width if args.width is not None or size is None else size[0],
        height=args.height if args.height is not None or size is None else size[1],
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
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(n)]
    check_writable(paths)
    return paths


@dataclasses.dataclass(frozen=True)
class Chosen:
    """What the files' headers say about the model, before anything is loaded."""

    paths: ModelPaths
    preset: AnyPreset
    flux: FluxParams  # FLUX.2: Flux2Params
    ae: AutoEncoderParams  # FLUX.2: its autoencoder's params
    weight_bytes: int  # weights on the device at the peak (all four parts, unless offloaded or staged)
    device: str
    dtype: torch.dtype
    weights: str  # --weights: "full" or "fp8"
    residency: Residency
    loras: Loras  # --lora files, read and checked against the transformer's header

    @property
    def pixels_per_token(self) -> int:
        """Image pixels a token covers: sizes must be multiples of it."""
        return 2 * self.ae.downsampling

    @property
    def depth(self) -> int:
        """Double blocks of the transformer: the range an edit's blocks must fall in."""
        return self.flux.depth

    def check_fits(self, s: SampleSettings, batch: int = 1, conditions: int = 0) -> None:
        """Refuse a run whose memory this device does not have (resources.py)."""
        need = footprint(self.weight_bytes, self.flux, self.ae, text_length(self.preset), s.width, s.height,
                         self.pixels_per_token, batch, s.cfg_scale != 1.0, conditions, self.dtype)  # fmt: skip
        try:
            check_fits(need, self.device, f"{s.width}x{s.height} px, batch {batch}")
        except ValueError as e:
            raise CLIError(str(e)) from None


def choose_model(args, unfused_loras: bool = False) -> Chosen:
    """Check device and dtype, find the model's files (default: the shipped flux-mini), read their headers
    and the LoRA files (unfused_loras: their strengths will change, as in a lora_scale sweep)."""
    device = check_device(args.device)
    residency = residency_from(args)
    dtype = resolve_dtype(args.dtype, device)
    check_weights_format(args.weights, device)
    if getattr(args, "compile", False):
        check_compile_support(device)  # before any file is read: a one-line refusal (a ValueError)
    model = args.model if args.model else flux_mini_path()
    paths = resolve_paths(model, args.ae, args.text_encoders)
    preset = resolve_preset(paths, args.preset)
    family = family_loaders(preset)
    files = open_weights(paths.transformer, "transformer")
    flux, ae = family.check_model(files, None), family.check_ae(open_weights(paths.ae, "ae"))
    n_fp8 = quantized_count(files) if args.weights == "fp8" else 0
    weights = resident_bytes(part_weights(paths), flux, residency, device, dtype, n_fp8,
                             text_layer_weights(paths, preset.family))  # fmt: skip
    loras = loras_from(args, preset.family, unfused_loras)
    family.check_loras(loras, files)
    chosen = Chosen(paths, preset, flux, ae, weights, device, dtype, args.weights, residency, loras)
    images = getattr(args, "image", None)
    if isinstance(images, list) and preset.family == "flux1":  # --image, repeatable for FLUX.2's references
        if len(images) > 1:
            raise CLIError(f"{preset.name} takes one --image; got {len(images)} (several reference images are "
                           "for FLUX.2 models)")  # fmt: skip
        args.image = images[0]
    return chosen


def run_generate(args) -> int:
    # Validate everything first: nothing is loaded or written before the arguments are known good.
    seeds = seeds_for(args)
    prompts = [p for p in args.prompt for _ in seeds]
    all_seeds = seeds * len(args.prompt)
    paths = output_paths(args.out, len(prompts))
    chosen = choose_model(args)
    check_kontext_image(args, chosen)
    image, size = kontext_image(args, chosen) if args.image else (None, None)
    s = settings_from(args, chosen, size=size)
    chosen.check_fits(s, batch=len(seeds), conditions=1 if image else 0)
    models = load_for(args, chosen)
    images = []
    for i in range(0, len(prompts), len(seeds)):
        images += generate(models, prompts[i : i + len(seeds)], all_seeds[i : i + len(seeds)], s, progress=not args.quiet,
                           image=image)  # fmt: skip
    extra = {"image_path": image_paths(args)} if image else {}
    params = run_metadata("generate", models, s, prompt=None, seed=None, **extra)  # weight files hashed once
    with FileSet() as outputs:
        for image, path, prompt, seed in zip(images, paths, prompts, all_seeds, strict=True):
            save_png(image, path, {**params, "prompt": prompt, "seed": seed}, outputs)
    print(*paths, sep="\n")
    return 0


def load_for(args, chosen: Chosen):
    if getattr(args, "quiet", False):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its "Loading weights" bars too: --quiet means no bars
    t0 = time.perf_counter()
    p = chosen.paths
    models = load_models(p.transformer, preset=args.preset, ae=p.ae, text_encoders=p.text_encoders, device=args.device,
                         dtype=args.dtype, weights=chosen.weights, residency=chosen.residency,
                         compile=args.compile, loras=chosen.loras)  # fmt: skip
    took = time.perf_counter() - t0
    print(f"loaded {models.preset.name}-shaped model from {p.transformer} in {took:.1f} s", file=sys.stderr)
    return models


def instruction_of(args) -> str:
    """edit's base prompt: the positional prompt or --instruction (one of them)."""
    if (args.prompt is None) == (args.instruction is None):
        raise CLIError("give the base prompt (or, for a Kontext model, --instruction), once")
    return args.prompt if args.prompt is not None else args.instruction


def check_kontext_image(args, chosen: "Chosen", inverts: bool = False) -> None:
    """A Kontext model needs --image; a text-to-image model takes none unless the command inverts it (edit).
    FLUX.2 models take any number (reference images)."""
    if chosen.preset.family == "flux2":
        return
    if chosen.preset.kontext and not getattr(args, "image", None):
        raise CLIError(f"{chosen.preset.name} is a Kontext model: it edits an image by instruction; give --image FILE")
    if args.image and not chosen.preset.kontext and not inverts:
        raise CLIError(f"{chosen.preset.name} draws from text only and takes no --image (a Kontext model does); "
                       "to edit a real image use `fluxspace edit --image` (inversion)")  # fmt: skip


def kontext_image(args, chosen: "Chosen"):
    """(image, its size): the Kontext conditioning image, or FLUX.2's reference images (a list; the
    size is the first one's), read and fitted before anything loads (errors name the file)."""
    try:
        if chosen.preset.family == "flux2":
            images = read_references(args.image)
            return images, images[0].size
        image = fit_condition(args.image, chosen.preset, chosen.pixels_per_token)
        return image, image.size
    except ValueError as e:
        raise CLIError(str(e)) from None


def image_paths(args) -> str | list[str]:
    """--image as PNG metadata records it: the path (FLUX.1), the list of reference paths (FLUX.2)."""
    return [str(p) for p in args.image] if isinstance(args.image, list) else str(args.image)


def run_edit(args) -> int:
    args.prompt = instruction_of(args)
    chosen = choose_model(args)
    check_kontext_image(args, chosen, inverts=True)
    spec = spec_from(args)
    # the image conditions the runs (Kontext; FLUX.2's references) rather than being inverted
    kontext = chosen.preset.kontext or (chosen.preset.family == "flux2" and args.image is not None)
    image, size = kontext_image(args, chosen) if kontext else (None, None)  # its size is the default size
    settings = settings_from(args, chosen, real_image=args.image is not None and not kontext, size=size)
    check_spec(spec, settings, chosen)
    if len(args.seed) != 1:
        raise CLIError("edit takes one --seed")
    seeds_for(args)  # the seed's range
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out-dir {out} exists and is not a folder")
    names = ["original.png", "edited.png", "side_by_side.png", *mask_names(spec)]
    check_writable([out / name for name in names])
    inversion = inversion_from(args) if args.image and not kontext else None
    if args.image and not kontext:
        image = _image(args, chosen)  # a real image to invert
    size = dataclasses.replace(settings, width=image.width, height=image.height) if image and not kontext else settings
    chosen.check_fits(size, conditions=1 + len(spec.concepts) if spec.has_fine else 0)
    models = load_for(args, chosen)
    result = edit_image(models, args.prompt, spec, seed=args.seed[0], settings=settings, progress=not args.quiet,
                        image=image, inversion=inversion, fit=args.fit)  # fmt: skip
    params = edit_params(result, models)
    if image is not None and kontext:
        params |= {"image_path": image_paths(args), "instruction": args.prompt}
    elif image is not None:
        params |= {"image_path": str(args.image), "inversion": dataclasses.asdict(inversion), "fit": args.fit}
    images = [result.original, result.edited, side_by_side([result.original, result.edited])]
    images += [mask_overlay(result.original, mask) for mask in result.masks]
    roles = ["original", "edited", "side_by_side", *(f"mask {c.prompt}" for c in spec.concepts)]
    with FileSet() as outputs:
        for image_, name, role in zip(images, names, roles, strict=True):
            save_png(image_, out / name, {**params, "image": role}, outputs)
    print(*(out / name for name in names), sep="\n")
    return 0


def _image(args, chosen: Chosen):
    """The image, read and fitted to the model's token grid before any model is loaded (errors name the
    file and the problem)."""
    try:
        image = read_image(args.image)
        if args.size:
            image = fit_image(image, 1, "resize", args.size)
        return fit_image(image, chosen.pixels_per_token, args.fit)
    except ValueError as e:
        raise CLIError(str(e)) from None


def run_invert(args) -> int:
    chosen = choose_model(args)
    if chosen.preset.family == "flux2":
        raise CLIError(NO_FLUX2_INVERSION)
    settings = settings_from(args, chosen, real_image=True)
    seeds_for(args)  # the seed's range (RF-Inversion's target noise)
    inversion = inversion_from(args)
    (out,) = output_paths(args.out, 1)
    image = _image(args, chosen)
    chosen.check_fits(dataclasses.replace(settings, width=image.width, height=image.height))
    models = load_for(args, chosen)
    r = invert_image(models, image, args.prompt, settings=settings, inversion=inversion, fit=args.fit, seed=args.seed[0])
    s = r.settings
    params = run_metadata("invert", models, s, prompt=args.prompt, seed=args.seed[0], image_path=str(args.image),
                          inversion=dataclasses.asdict(inversion), fit=args.fit, psnr_db=r.psnr,
                          evaluations=r.evaluations)  # fmt: skip
    print(save_png(r.reconstruction, out, params))
    print(f"reconstruction PSNR {r.psnr:.2f} dB at {r.image.width}x{r.image.height}, {s.steps} steps, "
          f"{r.evaluations} transformer evaluations")  # fmt: skip
    return 0


def run_sweep(args) -> int:
    axes = [grammar.vary(item) for item in args.vary]
    if len(axes) > 2:
        raise CLIError(f"--vary at most twice; got {len(axes)}")
    lora_sweep = any(name == "lora_scale" for name, _ in axes)
    if lora_sweep and not args.lora:
        raise CLIError("--vary lora_scale needs a LoRA: add --lora FILE")
    chosen = choose_model(args, unfused_loras=lora_sweep)  # strengths change cell to cell: unfused
    check_kontext_image(args, chosen)
    image, size = kontext_image(args, chosen) if args.image else (None, None)
    spec = spec_from(args)
    settings = settings_from(args, chosen, size=size)
    for name, values in axes:
        for v in values:
            check_spec(vary(spec, name, v), settings, chosen)
    if len(args.seed) != 1:
        raise CLIError("sweep takes one --seed")
    seeds_for(args)  # the seed's range
    (out,) = output_paths(args.out, 1)
    chosen.check_fits(settings, conditions=1 + len(spec.concepts) if spec.has_fine else 0)
    models = load_for(args, chosen)
    shards = out.with_name(out.name + ".shards")  # used under torchrun only (fluxspace/distributed.py)
    grid, results = sweep(
        models, args.prompt, spec, axes, seed=args.seed[0], settings=settings, progress=not args.quiet, shards=shards,
        image=image,
    )
    if grid is None:  # a rank other than 0 of a sharded sweep: its cells are in the shard folder
        return 0
    params = {**edit_params(results[0][0], models, "sweep"), "vary": {n: v for n, v in axes}}
    print(save_png(grid, out, params))
    return 0


def check_port(host: str, port: int) -> None:
    """Refuse, before the model loads, an address this process cannot listen on (a port in use, a
    host name that is not this machine's)."""
    if not 0 < port < 65536:
        raise CLIError(f"--port must be in [1, 65535]; got {port}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no refusal
            s.bind(address)
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None


def run_app(args) -> int:
    """Load the model once, then serve the editor (fluxspace/app/) until Ctrl-C."""
    check_port(args.host, args.port)
    try:
        from .app.page import serve
    except ImportError as e:
        raise CLIError(f"the app needs the app extra ({e.name or e} is missing): pip install 'fluxspace[app]'") from None
    chosen = choose_model(args)
    models = load_for(args, chosen)
    return serve(models, host=args.host, port=args.port)


COMMANDS = {"generate": run_generate, "edit": run_edit, "invert": run_invert, "sweep": run_sweep, "app": run_app}


_RUNNING = []  # commands in progress in this process (main() calls)
_TERMINATED = []  # set by the SIGTERM handler: what an exception then says is only the unwinding


def _terminate(signum, frame):
    """SIGTERM: inside a command, unwind like Ctrl-C (temporaries removed); after it, just exit.

    The exception may surface converted by a C extension it passed through (a loader's error), so
    main() also looks at _TERMINATED, not only at the exception's type."""
    if _RUNNING:
        _TERMINATED.append(signum)
        raise Terminated()
    os._exit(128 + signum)


def error_message(e: BaseException) -> str:
    """One line for an error: our own errors say it all; the system's get their file name."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return f"out of memory ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'})"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FLUXSPACE_DEBUG", "") not in ("", "0")
    signal.signal(signal.SIGTERM, _terminate)  # kept after return: a late SIGTERM exits 143, not by the signal
    _RUNNING.append(args.command)
    try:
        try:
            return COMMANDS[args.command](args)
        except BaseException as e:
            if _TERMINATED and not isinstance(e, Terminated):
                raise Terminated() from e  # the unwinding, whatever a C extension turned it into
            raise
    except Terminated:
        if debug:
            traceback.print_exc()
        print("fluxspace: stopped by SIGTERM; no partial output was left", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("fluxspace: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError, MemoryError, torch.OutOfMemoryError) as e:
        if debug:
            traceback.print_exc()
        parser.exit(2, f"fluxspace: error: {error_message(e)}\n")
    except Exception as e:  # a bug of ours: still one line, with the way to see more
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        parser.exit(1, f"fluxspace: internal error: {type(e).__name__}: {error_message(e)}{hint}\n")
    finally:
        _RUNNING.pop()


if __name__ == "__main__":
    sys.exit(main())
