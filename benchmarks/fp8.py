"""fp8 weights against bf16 on the same random weights: storage bytes and the error of the forward.

    python benchmarks/fp8.py                                   # flux-dev width, 1 double + 2 single blocks
    python benchmarks/fp8.py --depth 2 --depth-single 4 --height 512 --width 512

What it does
- Writes a seeded random bf16 checkpoint in the official layout (weights_tools.random_weights) at
  the preset's full width with fewer blocks, and `flux-weights convert --to fp8` of it (the scaled
  layout). Loads the bf16 file three ways: `weights="full"` in bfloat16, `weights="fp8"` (quantized
  as it is read; compute in bfloat16), `weights="full"` in float32 (the reference); and the fp8 file
  with `weights="fp8"`, which must hold the same tensors as the quantized-at-load model.
- Storage: bytes of the quantized Linear weights in bf16 and in fp8 (the per-tensor float32 scales
  are counted apart), the whole state dict of each model, and the share of the preset's weights at
  full depth that fp8 holds (from the meta-device model: no memory).
- Weight error: per quantized layer ||W_fp8 * s - W|| / ||W|| (Frobenius, float32), mean and max.
- Forward error: ||out - ref|| / ||ref|| over the whole output, for fp8 against bf16 (both computing
  in bf16: the error fp8 storage adds) and for each against the float32 model (bf16 arithmetic's own
  error, for scale), and fp8 weights computing in float32 against float32 (the rounding of the
  weights alone, without bf16 arithmetic), at each of `--timesteps`, on seeded random inputs (image and text tokens,
  pooled vector, guidance 3.5). Also the float32 model on the inputs rounded to bf16: how much
  the random model amplifies any perturbation (random full-width weights are far more sensitive
  than trained ones; compare fp8 with bf16 arithmetic rather than with an absolute bar).
- Time: the median of `--iters` forwards of each bf16-computing model (eager, CPU or CUDA), for
  information: weight-only fp8 upcasts each layer's weight on every call.
Prints a markdown table and writes JSON (settings, machine, figures) to benchmarks/results/.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from flux_core import Flux, get_preset, img_ids, load_flow_model, txt_ids
from flux_core.atomic import atomic_file
from flux_core.runtime.fp8 import Fp8Linear, is_quantized_weight
from weights_tools.convert import convert_file
from weights_tools.random_weights import write_random_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="flux-dev")
    p.add_argument("--depth", type=int, default=1, help="double blocks (default 1)")
    p.add_argument("--depth-single", type=int, default=2, help="single blocks (default 2)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--txt-len", type=int, default=64)
    p.add_argument("--timesteps", default="0.9,0.5,0.1", help="comma-separated t in [0, 1]")
    p.add_argument("--iters", type=int, default=3, help="timed forwards per model (median)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default: results/fp8-<device>-<preset>-d<D>s<S>.json)")
    return p.parse_args(argv)


def inputs(params, args, t: float, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    n_img = (args.height // 16) * (args.width // 16)
    x = dict(
        img=torch.randn(1, n_img, params.in_channels, generator=g),
        txt=torch.randn(1, args.txt_len, params.context_in_dim, generator=g),
        y=torch.randn(1, params.vec_in_dim, generator=g),
        timesteps=torch.tensor([t]),
        guidance=torch.tensor([3.5]),
    )
    x = {k: v.to(args.device, dtype) for k, v in x.items()}
    x["img_ids"] = img_ids(1, args.height, args.width).to(args.device)
    x["txt_ids"] = txt_ids(1, args.txt_len).to(args.device)
    return x


def run(model, x) -> torch.Tensor:
    with torch.inference_mode():
        return model(**x).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def timed(model, x, iters: int, device: str) -> float:
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(model, x)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def state_bytes(model) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


def full_depth_share(preset: str) -> float:
    """Share of the preset's transformer weights (full depth) that fp8 holds, from the meta model."""
    with torch.device("meta"):
        sd = Flux(get_preset(preset).params).state_dict()
    quantized = sum(v.numel() for k, v in sd.items() if is_quantized_weight(k, tuple(v.shape)))
    return quantized / sum(v.numel() for v in sd.values())


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fp8-bench-"))
    ckpt = write_random_checkpoint(
        args.preset, tmp, seed=args.seed, dtype="bfloat16", transformer_only=True,
        depth=args.depth, depth_single=args.depth_single, allow_large=True,
    ).transformer  # fmt: skip
    scaled = convert_file(ckpt, tmp / "fp8.safetensors", to="fp8").path

    t0 = time.perf_counter()
    bf16 = load_flow_model(ckpt, device=args.device, dtype=torch.bfloat16)
    load_bf16 = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp8 = load_flow_model(ckpt, device=args.device, dtype=torch.bfloat16, weights="fp8")
    load_fp8 = time.perf_counter() - t0
    from_file = load_flow_model(scaled, device=args.device, dtype=torch.bfloat16, weights="fp8")
    same = all(
        a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        for a, b in zip(fp8.state_dict().values(), from_file.state_dict().values(), strict=True)
    )
    del from_file
    ref = load_flow_model(ckpt, device=args.device, dtype=torch.float32)
    fp8_f32 = load_flow_model(scaled, device=args.device, dtype=torch.float32, weights="fp8")  # fp8 storage alone

    names = [n for n, m in fp8.named_modules() if isinstance(m, Fp8Linear)]
    linear_bf16 = sum(bf16.get_submodule(n).weight.nbytes for n in names)
    linear_fp8 = sum(fp8.get_submodule(n).weight.nbytes for n in names)
    scale_bytes = sum(fp8.get_submodule(n).scale_weight.nbytes for n in names)
    weight_errors = []
    for n in names:
        m, w = fp8.get_submodule(n), ref.get_submodule(n).weight
        weight_errors.append(rel(m.weight.float() * m.scale_weight, w))

    forward = []
    for t in (float(s) for s in args.timesteps.split(",")):
        xb, xf = inputs(bf16.params, args, t, torch.bfloat16), inputs(bf16.params, args, t, torch.float32)
        out_bf16, out_fp8, out_ref = run(bf16, xb), run(fp8, xb), run(ref, xf)
        rounded = {k: v if k.endswith("_ids") else v.to(torch.bfloat16).float() for k, v in xf.items()}
        out_rounded = run(ref, rounded)
        forward.append({
            "t": t, "fp8_vs_bf16": rel(out_fp8, out_bf16), "bf16_vs_f32": rel(out_bf16, out_ref),
            "fp8_vs_f32": rel(out_fp8, out_ref), "f32_bf16_rounded_inputs_vs_f32": rel(out_rounded, out_ref),
            "fp8_f32_compute_vs_f32": rel(run(fp8_f32, xf), out_ref),
        })  # fmt: skip
    x = inputs(bf16.params, args, 0.5, torch.bfloat16)
    time_bf16, time_fp8 = timed(bf16, x, args.iters, args.device), timed(fp8, x, args.iters, args.device)

    result = {
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "image_tokens": (args.height // 16) * (args.width // 16)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "python": sys.version.split()[0]},
        "storage": {
            "quantized_layers": len(names), "linear_weight_bytes_bf16": linear_bf16, "linear_weight_bytes_fp8": linear_fp8,
            "ratio": linear_fp8 / linear_bf16, "scale_bytes": scale_bytes,
            "state_dict_bytes_bf16": state_bytes(bf16), "state_dict_bytes_fp8": state_bytes(fp8),
            "quantized_share_of_weights_at_full_depth": full_depth_share(args.preset),
        },
        "weight_error": {"mean": statistics.mean(weight_errors), "max": max(weight_errors)},
        "forward": forward,
        "fp8_file_equals_quantized_at_load": same,
        "seconds": {"load_bf16": load_bf16, "load_fp8_quantizing": load_fp8, "forward_bf16": time_bf16, "forward_fp8": time_fp8},
    }  # fmt: skip
    print_table(result)
    out = args.out or RESULTS / f"fp8-{args.device}-{args.preset}-d{args.depth}s{args.depth_single}.json"
    with atomic_file(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out}")
    return result


def print_table(r: dict) -> None:
    s, MiB = r["storage"], 2**20
    print("| storage | bf16 | fp8 | ratio |\n|---|---|---|---|")
    print(f"| quantized Linear weights ({s['quantized_layers']} layers) | {s['linear_weight_bytes_bf16'] / MiB:.1f} MiB "
          f"| {s['linear_weight_bytes_fp8'] / MiB:.1f} MiB (+ {s['scale_bytes']} B of scales) | {s['ratio']:.4f} |")
    print(f"| whole state dict | {s['state_dict_bytes_bf16'] / MiB:.1f} MiB | {s['state_dict_bytes_fp8'] / MiB:.1f} MiB "
          f"| {s['state_dict_bytes_fp8'] / s['state_dict_bytes_bf16']:.4f} |")
    print(f"\nfp8 holds {100 * s['quantized_share_of_weights_at_full_depth']:.2f}% of the weights at full depth; "
          f"per-layer weight error ||W8 - W|| / ||W||: mean {r['weight_error']['mean']:.4f}, max {r['weight_error']['max']:.4f}")
    print("\nrelative error of the forward, ||out - ref|| / ||ref||:")
    print("\n| t | fp8 vs bf16 | bf16 vs f32 | fp8 vs f32 | fp8 computing in f32 vs f32 | f32, inputs rounded to bf16, vs f32 |")
    print("|---|---|---|---|---|---|")
    for f in r["forward"]:
        print(f"| {f['t']} | {f['fp8_vs_bf16']:.5f} | {f['bf16_vs_f32']:.5f} | {f['fp8_vs_f32']:.5f} "
              f"| {f['fp8_f32_compute_vs_f32']:.5f} | {f['f32_bf16_rounded_inputs_vs_f32']:.5f} |")
    sec = r["seconds"]
    print(f"\nforward (median): bf16 {sec['forward_bf16']:.2f} s, fp8 {sec['forward_fp8']:.2f} s; "
          f"load: bf16 {sec['load_bf16']:.2f} s, fp8 (quantizing) {sec['load_fp8_quantizing']:.2f} s; "
          f"fp8 file == quantized at load: {r['fp8_file_equals_quantized_at_load']}")  # fmt: skip


if __name__ == "__main__":
    main()
