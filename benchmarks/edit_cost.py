"""Per-step cost of FluxSpace editing against a plain step, side by side in one run.

Rows (one transformer forward each, same random weights and inputs):
  plain          the model alone
  fluxspace      one fine concept (tau_m 0.5) + coarse, our shared execution (fluxspace/step.py)
  fine-only      one fine concept, no coarse
  coarse-only    lambda_coarse only: no extra text streams at all
  two-concepts   two fine concepts in one pass
  reference      fine + coarse executed as the unofficial code does (a full joint attention per branch)
  naive-batch3   the naive way: base, prior and edit prompts as a batch-3 full forward

FLUX.2 (--preset flux2-dev / flux2-klein-4b / flux2-klein-9b): the same FluxSpace code through the same
seam; FLUX.2 has no pooled text vector, so no coarse rows, and its fluxspace row is the fine edit alone
(FLUX2_ROWS). Weights as benchmarks/flux2_forward.py draws them; text 512 tokens unless --txt-len.

With --compile every row runs with each block compiled once (flux_core.runtime.compile_blocks);
the warmup calls compile (`first call s` per row, in row order, so later rows reuse the plain
graphs), and each row's output is compared with the same row run eagerly first (`rel err`).

Rounds interleave the rows (plain, fluxspace, ..., plain, fluxspace, ...) so that a slow spell of
the machine hits every row alike; the table gives each row's median and its ratio to plain.

    python benchmarks/edit_cost.py --hidden 1024 --heads 8 --depth 2 --depth-single 4 \
        --height 512 --width 512 --txt-len 128          # CPU, mid-size: T/N = 1/8 like dev at 1024^2
    python benchmarks/edit_cost.py --preset flux-dev --height 1024 --width 1024 --device cuda
    python benchmarks/edit_cost.py --preset flux2-klein-4b --depth 1 --depth-single 2 \
        --height 1024 --width 1024 --txt-len 512                       # CPU: klein 4B width, its token shape
"""

import argparse
import dataclasses
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux2_forward import random_state_dict as random_flux2_state_dict  # noqa: E402
from forward import RESULTS, machine_info, random_official_state_dict, time_calls, write_json  # noqa: E402

from flux_core import Flux, get_preset  # noqa: E402
from flux_core.flux2 import sampling as flux2_sampling  # noqa: E402
from flux_core.flux2.model import Flux2, get_params  # noqa: E402
from flux_core.runtime import compile_blocks  # noqa: E402
from flux_core.sampling import img_ids, txt_ids  # noqa: E402
from fluxspace.spec import Concept, EditSpec, EncodedEdit  # noqa: E402
from fluxspace.step import FluxSpaceEdit  # noqa: E402

ROWS = ("plain", "fluxspace", "fine-only", "coarse-only", "two-concepts", "reference", "naive-batch3")
FLUX2_ROWS = ("plain", "fluxspace", "two-concepts", "reference", "naive-batch3")
FLUX2_TEXT_TOKENS = 512  # FLUX.2 pads every prompt to 512 tokens (flux_core/flux2/conditioner.py)


def flux2_size(name: str):
    """The Flux2Params of a FLUX.2 size, or None for a FLUX.1 preset."""
    try:
        return get_params(name)
    except KeyError:
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="flux-dev")
    p.add_argument("--hidden", type=int, help="override the width (CPU runs)")
    p.add_argument("--heads", type=int, help="override the head count (head dim must stay 128 unless --axes)")
    p.add_argument("--depth", type=int)
    p.add_argument("--depth-single", type=int)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--txt-len", type=int, help="T5 tokens (default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bf16 on cuda, float32 on cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per row, at least 1 (it compiles)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (rows compare with eager)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode with --compile")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flux2 = flux2_size(args.preset) is not None
    preset = None if flux2 else get_preset(args.preset)
    params = flux2_size(args.preset) if flux2 else preset.params
    overrides = {k: v for k, v in (("hidden_size", args.hidden), ("num_heads", args.heads), ("depth", args.depth),
                                   ("depth_single_blocks", args.depth_single)) if v is not None}  # fmt: skip
    params = dataclasses.replace(params, **overrides)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    )
    T = args.txt_len or (FLUX2_TEXT_TOKENS if flux2 else preset.t5_max_length)
    N = (args.height // 16) * (args.width // 16)
    rows_run = FLUX2_ROWS if flux2 else ROWS

    with torch.device("meta"):
        model = Flux2(params) if flux2 else Flux(params)
    sd = (random_flux2_state_dict if flux2 else random_official_state_dict)(params, 0, args.device, dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(args.device, dtype)

    guidance = torch.full((1,), 3.5, device=args.device, dtype=dtype) if params.guidance_embed else None
    if flux2:
        rows_px, cols_px = args.height // 16, args.width // 16
        inp = dict(
            img=rand(1, N, params.in_channels), img_ids=flux2_sampling.img_ids(1, rows_px, cols_px, device=args.device),
            txt=rand(1, T, params.context_in_dim), txt_ids=flux2_sampling.txt_ids(1, T, args.device),
            timesteps=torch.full((1,), 0.7, device=args.device, dtype=dtype), guidance=guidance,
        )  # fmt: skip
    else:
        inp = dict(
            img=rand(1, N, params.in_channels), img_ids=img_ids(1, args.height, args.width, args.device),
            txt=rand(1, T, params.context_in_dim), txt_ids=txt_ids(1, T, args.device),
            timesteps=torch.full((1,), 0.7, device=args.device, dtype=dtype), y=rand(1, params.vec_in_dim),
            guidance=guidance,
        )  # fmt: skip

    def pooled():  # the coarse prompt's pooled vector; FLUX.2 has none (no coarse edit)
        return None if flux2 else rand(1, params.vec_in_dim)

    inp3 = {k: (v.repeat(3, *[1] * (v.ndim - 1)) if v is not None else None) for k, v in inp.items()}
    pos = [[1, 2]]
    enc1 = EncodedEdit(rand(2, T, params.context_in_dim), pooled(), pos)
    enc2 = EncodedEdit(rand(3, T, params.context_in_dim), pooled(), pos * 2)
    coarse = 0.0 if flux2 else 0.5  # FLUX.2: the fine edit alone
    specs = {
        "fluxspace": (EditSpec(concepts=(Concept("a", 5.0, 0.5),), lambda_coarse=coarse), enc1),
        "fine-only": (EditSpec(concepts=(Concept("a", 5.0, 0.5),)), enc1),
        "coarse-only": (EditSpec(concepts=(Concept("a", 0.0),), lambda_coarse=0.5), enc1),
        "two-concepts": (EditSpec(concepts=(Concept("a", 5.0, 0.5), Concept("b", 3.0, 0.5))), enc2),
        "reference": (EditSpec(concepts=(Concept("a", 5.0, 0.5),), lambda_coarse=coarse, reference=True), enc1),
    }
    specs = {name: spec for name, spec in specs.items() if name in rows_run}
    calls = {"plain": lambda: model(**inp), "naive-batch3": lambda: model(**inp3)}
    for name, (spec, enc) in specs.items():
        calls[name] = lambda spec=spec, enc=enc: model(**inp, edit=FluxSpaceEdit(spec, enc))

    times = {name: [] for name in rows_run}
    first_call_s, rel_err = {}, {}
    with torch.inference_mode():
        if args.compile:
            eager_out = {name: calls[name]().float() for name in rows_run}
            # Seven edit configurations in one process, each its own graphs of the block forward: more
            # than dynamo's default 8 per function, past which the rest would silently run eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compile_blocks(model, mode=None if args.compile_mode == "default" else args.compile_mode)
        for name in rows_run:
            t0 = time.perf_counter()
            out = calls[name]()
            first_call_s[name] = time.perf_counter() - t0
            if args.compile:
                rel_err[name] = ((out.float() - eager_out[name]).norm() / eager_out[name].norm()).item()
            time_calls(calls[name], args.device, args.warmup - 1)
        for _ in range(args.rounds):
            for name in rows_run:
                times[name] += time_calls(calls[name], args.device, 1)
    medians = {name: statistics.median(t) for name, t in times.items()}
    mins = {name: min(t) for name, t in times.items()}
    rows = [
        {
            "row": n,
            "median_ms": medians[n],
            "ratio_to_plain": medians[n] / medians["plain"],
            "min_ms": mins[n],
            "min_ratio_to_plain": mins[n] / mins["plain"],
            "times_ms": times[n],
            "first_call_s": first_call_s[n],
            "rel_err_vs_eager": rel_err.get(n),
        }
        for n in rows_run
    ]
    print(f"\nFluxSpace step cost: {args.preset} hidden {params.hidden_size}, {params.depth} double + "
          f"{params.depth_single_blocks} single blocks, {N} image + {T} text tokens, {args.device} {dtype}"
          f"{', blocks compiled (regional)' if args.compile else ', eager'}\n")  # fmt: skip
    print("| step | median ms | x plain (median) | min ms | x plain (min) | first call s | rel err vs eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["rel_err_vs_eager"] is None else f"{r['rel_err_vs_eager']:.1e}"
        print(f"| {r['row']} | {r['median_ms']:.1f} | {r['ratio_to_plain']:.3f} | {r['min_ms']:.1f} "
              f"| {r['min_ratio_to_plain']:.3f} | {r['first_call_s']:.1f} | {err} |")  # fmt: skip
    out = (
        args.out
        or RESULTS
        / f"edit_cost-{args.device}-{args.preset}-h{params.hidden_size}-d{params.depth}s{params.depth_single_blocks}-{args.height}x{args.width}-t{T}{'-compiled' if args.compile else ''}.json"
    )
    data = {
        "settings": {
            **vars(args),
            "model": "FLUX.2" if flux2 else "FLUX.1",
            "out": str(out),
            "params": dataclasses.asdict(params),
            "image_tokens": N,
            "text_tokens": T,
        },
        "machine": machine_info(args.device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    write_json(out, data)
    print(f"\nsaved {out}")
    return data


if __name__ == "__main__":
    main()
