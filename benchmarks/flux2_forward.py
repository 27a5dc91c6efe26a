"""Time one FLUX.2 transformer step: ours eager, ours with regional compile, diffusers' Flux2Transformer2DModel.

Same random weights (official layout, seeded; diffusers gets them through our flux_core.flux2.formats
rename, which tests/test_flux2_model.py checks against diffusers' own converter), same inputs, device and
dtype; every row's output is compared with diffusers eager (||out - ref|| / ||ref||, float32), so all
rows compute the same function. One process, rows one after the other (unlike forward.py's subprocess
per row: no memory figures here, only time and agreement).

    python benchmarks/flux2_forward.py --preset flux2-klein-4b --width-blocks 1,2 \
        --height 256 --width 256 --txt-len 64                      # klein 4B width on a CPU: 256 + 64 tokens
    python benchmarks/flux2_forward.py --preset flux2-klein-4b --device cuda --dtype bf16   # full size, 1024^2

Time: `--warmup` calls (at least one; the first compiles: `first call s`), then the median of `--iters`
calls under torch.inference_mode; CUDA events on a GPU, time.perf_counter on the CPU (forward.py
time_calls). Weights: linear weights N(0, 1/fan_in), norm scales 1 + N(0, 0.01^2), so activations stay
O(1) at any width.
"""

import argparse
import dataclasses
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import RESULTS, machine_info, time_calls, write_json  # noqa: E402

from flux_core.flux2.formats import bfl_to_diffusers_transformer  # noqa: E402
from flux_core.flux2.model import Flux2, Flux2Params, get_params  # noqa: E402
from flux_core.flux2.sampling import img_ids, txt_ids  # noqa: E402
from flux_core.runtime import compile_blocks  # noqa: E402

ROWS = (("ours", "eager"), ("ours", "regional"), ("diffusers", "eager"))
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
# Inputs of the forward: a mid-trajectory time and cli.py's dev guidance (ignored by klein).
TIMESTEP, GUIDANCE = 0.7, 4.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux2-klein-4b", help="a FLUX.2 size (flux_core.flux2.model)")
    p.add_argument(
        "--width-blocks", help="D,S: the preset's width with D double and S single blocks (CPU runs)"
    )
    p.add_argument("--hidden", type=int, help="override the width (smoke tests; head dim stays sum(axes_dim))")
    p.add_argument("--heads", type=int, help="override the head count, with --hidden")
    p.add_argument(
        "--height", type=int, default=1024, help="pixels (multiple of 16); image tokens = H/16 * W/16"
    )
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--txt-len", type=int, default=512, help="text tokens (FLUX.2 pads prompts to 512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="leave out the regional-compile row")
    p.add_argument(
        "--no-diffusers", action="store_true", help="leave out diffusers (the reference is then ours eager)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    get_params(args.preset)  # unknown sizes: a KeyError listing the valid ones
    if args.height % 16 or args.width % 16:
        raise ValueError(
            f"height and width must be multiples of 16 (FLUX.2 tokens are 16 px); got {args.height}x{args.width}"
        )
    if args.width_blocks is not None:
        try:
            d, s = (int(x) for x in args.width_blocks.split(","))
        except ValueError:
            raise ValueError(f"--width-blocks takes D,S (e.g. 1,2); got {args.width_blocks!r}") from None
        if d < 1 or s < 0:
            raise ValueError(f"--width-blocks needs D >= 1 and S >= 0; got {args.width_blocks!r}")
    return args


def model_params(args) -> Flux2Params:
    params = get_params(args.preset)
    if args.width_blocks:
        d, s = (int(x) for x in args.width_blocks.split(","))
        params = dataclasses.replace(params, depth=d, depth_single_blocks=s)
    if args.hidden or args.heads:
        params = dataclasses.replace(params, hidden_size=args.hidden or params.hidden_size,
                                     num_heads=args.heads or params.num_heads)  # fmt: skip
    return params


def random_state_dict(params: Flux2Params, seed: int, device, dtype) -> dict[str, torch.Tensor]:
    """Official-layout tensors, drawn on `device` (a full-size model never exists in float32 on the host)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux2(params).state_dict().items()}
    g = torch.Generator(device).manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        out[k] = (1 + 0.01 * t if k.endswith(".scale") else t / shape[-1] ** 0.5).to(dtype)
    return out


def build_ours(params: Flux2Params, sd: dict) -> Flux2:
    with torch.device("meta"):
        model = Flux2(params)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def build_diffusers(params: Flux2Params, sd: dict):
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        net = Flux2Transformer2DModel(
            patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
            num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
            num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
            mlp_ratio=params.mlp_ratio, axes_dims_rope=tuple(params.axes_dim), rope_theta=params.theta,
            guidance_embeds=params.guidance_embed,
        )  # fmt: skip
    net.load_state_dict(bfl_to_diffusers_transformer(sd), strict=True, assign=True)  # it has no buffers
    return net.eval()


def make_inputs(params: Flux2Params, args, device, dtype) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1)
    rows, cols = args.height // 16, args.width // 16
    return dict(
        img=torch.randn(1, rows * cols, params.in_channels, generator=g).to(device, dtype),
        img_ids=img_ids(1, rows, cols, device=device),
        timesteps=torch.full((1,), TIMESTEP, device=device, dtype=dtype),
        txt=torch.randn(1, args.txt_len, params.context_in_dim, generator=g).to(device, dtype),
        txt_ids=txt_ids(1, args.txt_len, device=device),
        guidance=torch.full((1,), GUIDANCE, device=device, dtype=dtype) if params.guidance_embed else None,
    )


def diffusers_call(net, inp: dict):
    return lambda: net(
        hidden_states=inp["img"], encoder_hidden_states=inp["txt"], timestep=inp["timesteps"],
        img_ids=inp["img_ids"][0], txt_ids=inp["txt_ids"][0], guidance=inp["guidance"], return_dict=False,
    )[0]  # fmt: skip


def run_row(fn, args) -> dict:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        time_calls(fn, args.device, max(args.warmup - 1, 0))
        times = time_calls(fn, args.device, args.iters)
    return {"status": "ok", "first_call_s": first, "times_ms": times, "median_ms": statistics.median(times),
            "min_ms": min(times), "output": out.float().cpu()}  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    params = model_params(args)
    sd = random_state_dict(params, args.seed, args.device, dtype)
    inp = make_inputs(params, args, args.device, dtype)
    rows = [
        r
        for r in ROWS
        if not (args.no_compile and r[1] == "regional") and not (args.no_diffusers and r[0] == "diffusers")
    ]
    results = []
    ours = build_ours(params, sd)
    for model, mode in rows:
        row = {"model": model, "mode": mode}
        try:
            if model == "ours":
                if mode == "regional":
                    compile_blocks(ours)
                row.update(run_row(lambda: ours(**inp), args))
            else:
                del ours  # one model's weights on the device at a time (plus the shared random tensors)
                net = build_diffusers(params, sd)
                row.update(run_row(diffusers_call(net, inp), args))
                del net
        except Exception as e:  # noqa: BLE001  a failing row is reported, not fatal
            row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                       traceback=traceback.format_exc())  # fmt: skip
        results.append(row)
    reference = next((r for r in results if r["model"] == "diffusers" and r["status"] == "ok"), results[0])
    ref_name = f"{reference['model']} {reference['mode']}"
    ref = reference.get("output")
    for r in results:
        if r["status"] == "ok" and ref is not None:
            out = r["output"]
            r["rel_err"] = ((out - ref).norm() / ref.norm()).item()
            r["ratio_to_reference"] = r["median_ms"] / reference["median_ms"]
    for r in results:
        r.pop("output", None)
    N, T = (args.height // 16) * (args.width // 16), args.txt_len
    print(f"\nFLUX.2 transformer step: {args.preset} hidden {params.hidden_size}, {params.depth} double + "
          f"{params.depth_single_blocks} single blocks, {N} image + {T} text tokens, {args.device} {dtype}\n")  # fmt: skip
    print(
        f"| model | mode | median ms | min ms | x {ref_name} | first call s | rel err vs {ref_name} | status |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["status"] != "ok":
            print(f"| {r['model']} | {r['mode']} | - | - | - | - | - | failed: {r['error']} |")
            continue
        err = r.get("rel_err")
        print(f"| {r['model']} | {r['mode']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r.get('ratio_to_reference', 0):.3f} "
              f"| {r['first_call_s']:.1f} | {'-' if err is None else f'{err:.1e}'} | ok |")  # fmt: skip
    blocks = f"-d{params.depth}s{params.depth_single_blocks}" if args.width_blocks else ""
    blocks = f"-h{params.hidden_size}{blocks}" if args.hidden else blocks
    out = (
        args.out
        or RESULTS / f"flux2_forward-{args.device}-{args.preset}{blocks}-{args.height}x{args.width}-t{T}.json"
    )
    data = {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "out": str(out),
                     "dtype": str(dtype).removeprefix("torch."), "params": dataclasses.asdict(params),
                     "image_tokens": N, "text_tokens": T},
        "machine": machine_info(args.device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": ref_name,
        "results": results,
    }  # fmt: skip
    write_json(out, data)
    print(f"\nsaved {out}")
    return data


if __name__ == "__main__":
    main()
