"""`flux-weights`: inspect, verify, convert and write random Flux weight files (FLUX.1 and FLUX.2).

    flux-weights inspect FILE_OR_FOLDER [--keys] [--json] [--model transformer|ae]
    flux-weights verify FILE_OR_FOLDER --preset P [--model transformer|ae]
    flux-weights convert IN OUT --to diffusers|bfl|fp8 [--model transformer|ae] [--force]
    flux-weights random --preset P --out DIR [--seed S] [--dtype float32|bfloat16]
                        [--transformer-only] [--depth N] [--depth-single M] [--force] [--allow-large]

`inspect --json` prints one JSON object, or a list of them (one per component) for a diffusers
pipeline folder holding transformer/ and vae/.

Exit codes: 0 success, 1 `verify` found mismatches, 2 bad input (unreadable or unknown file,
unknown preset, output exists, bad arguments). Run as `flux-weights` or `python -m weights_tools.cli`.
"""

import argparse
import json
import sys

from flux_core.formats import ConversionError
from flux_core.loading import CheckpointError

from .convert import TARGETS, convert_file
from .inspect import format_report, inspect_path
from .random_weights import DTYPE_CHOICES, write_random_checkpoint
from .verify import verify_file

MODELS = ("transformer", "ae")


def _inspect(args) -> int:
    reports = inspect_path(args.path, with_keys=args.keys, model=args.model)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0


def _verify(args) -> int:
    result = verify_file(args.path, args.preset, model=args.model)
    print(result.format())
    return 0 if result.ok else 1


def _convert(args) -> int:
    r = convert_file(args.src, args.dst, to=args.to, model=args.model, force=args.force)
    print(
        f"wrote {r.path}: {r.model}, {r.source_layout} -> {r.target_layout}, {r.num_in} -> {r.num_out} tensors"
    )
    return 0


def _random(args) -> int:
    r = write_random_checkpoint(
        args.preset,
        args.out,
        seed=args.seed,
        dtype=args.dtype,
        transformer_only=args.transformer_only,
        depth=args.depth,
        depth_single=args.depth_single,
        force=args.force,
        allow_large=args.allow_large,
    )
    print(f"wrote {r.transformer}")
    if r.ae:
        print(f"wrote {r.ae}")
    if r.text_encoders:
        print(f"wrote {r.text_encoders}/{', '.join(r.text_folders)}")
    for note in r.notes:
        print(f"note: {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux-weights", description="Inspect, verify, convert and write Flux weight files."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "inspect", help="keys, shapes, dtypes, layout, variant and inferred params of a file or folder"
    )
    p.add_argument("path", help="a .safetensors file, a folder of shards, or a diffusers pipeline folder")
    p.add_argument("--keys", action="store_true", help="list every key instead of groups")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--model", choices=MODELS, help="component of a diffusers pipeline folder (default: all)")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("verify", help="check keys and shapes against a preset (exit 1 on any mismatch)")
    p.add_argument("path", help="a .safetensors file or a diffusers folder")
    p.add_argument("--preset", required=True, help="preset name, e.g. flux-dev")
    p.add_argument("--model", choices=MODELS, help="component of a diffusers pipeline folder")
    p.set_defaults(run=_verify)

    p = sub.add_parser(
        "convert", help="convert between the official (bfl) and diffusers layouts, or to a scaled fp8 file"
    )
    p.add_argument("src", help="a .safetensors file, a folder of shards, or a diffusers pipeline folder")
    p.add_argument("dst", help="the .safetensors file to write")
    p.add_argument(
        "--to", required=True, choices=TARGETS,
        help="target layout; fp8: the blocks' Linear weights as float8 e4m3fn + scale_weight (official keys)",
    )  # fmt: skip
    p.add_argument("--model", choices=MODELS, help="transformer or ae (detected from the keys if left out)")
    p.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    p.set_defaults(run=_convert)

    p = sub.add_parser("random", help="write a seeded random checkpoint set in the official layout")
    p.add_argument("--preset", required=True, help="preset name, e.g. tiny")
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="transformer dtype (the AE is float32)"
    )
    p.add_argument("--transformer-only", action="store_true", help="skip the autoencoder and text encoders")
    p.add_argument("--depth", type=int, help="override the number of double blocks (a pruned model)")
    p.add_argument("--depth-single", type=int, help="override the number of single blocks (a pruned model)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument(
        "--allow-large", action="store_true",
        help="write a set larger than 4 GiB (flux-dev: 24 GB, flux2-dev: 64 GB in bfloat16)",
    )  # fmt: skip
    p.set_defaults(run=_random)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ConversionError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
