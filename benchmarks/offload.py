"""Peak memory of a staged run against an unstaged one, on the CPU (fluxspace/runtime.py).

Writes a random checkpoint set at full width with few blocks (weights_tools.random_weights: the
transformer of --preset at --depth / --depth-single, its real autoencoder, and random T5 / CLIP text
encoders of the real widths, T5 4096 and CLIP 768, with --t5-layers layers), then, in a fresh
subprocess per mode, loads it with fluxspace.load_models and generates one image:

    unstaged   load_models(...) then generate: every part in memory at once
    staged     load_models(..., staged=True) then generate: text encoders, then the transformer,
               then the autoencoder, each freed before the next is read

and reports the peak RSS of load + generate (VmHWM of /proc/self/status minus VmRSS before the
load; the high-water mark is reset just before, and glibc is first made to return freed memory and
to map large blocks on their own, as benchmarks/forward.py does) against the parts' sizes in the run
dtype. The target: a staged peak <= max(text encoders, transformer) + 10%, not their sum.

    python benchmarks/offload.py                          # flux-dev width, 1 double + 2 single blocks

All parts are stored in the run dtype (the random text encoders are converted after writing), so
no load converts: a float32 file loaded into bf16 holds both copies for a moment, which is not what
staging is about.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import machine_info, proc_status_bytes, release_freed_cpu_memory, reset_rss_peak, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3
MODES = ("unstaged", "staged")
TARGET = 1.10  # staged peak <= 1.1 x the largest of text encoders and transformer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux-dev")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--depth-single", type=int, default=2)
    p.add_argument("--t5-layers", type=int, default=3, help="layers of the random T5 (4096 wide, d_ff 10240)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--tmp", type=Path, help="folder for the temporary checkpoint (default: the system's)")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_worker(args) -> dict:
    from fluxspace import SampleSettings, generate, load_models

    result = {"mode": args.worker, "status": "ok"}
    try:
        import transformers  # noqa: F401  (imported before the baseline: not part of the run's memory)

        result["malloc_tuned"] = release_freed_cpu_memory()
        before = proc_status_bytes("VmRSS")
        result["peak_method"] = "VmHWM after clear_refs" if reset_rss_peak() else "VmHWM since start"
        t0 = time.perf_counter()
        models = load_models(args.checkpoint, device="cpu", dtype=args.dtype, staged=args.worker == "staged")
        settings = SampleSettings(width=args.size, height=args.size, steps=args.steps)
        generate(models, ["a photo of a cat"], [0], settings, progress=False)
        result["run_s"] = time.perf_counter() - t0
        result["peak_rss_bytes"] = proc_status_bytes("VmHWM") - before
        result["loads"] = dict(models.runtime.loads)
    except Exception as e:
        result.update(status="failed", error=f"{type(e).__name__}: {str(e).strip()[:300]}")
        result["traceback"] = traceback.format_exc()[-4000:]
    return result


def part_bytes(ckpt: Path, dtype: torch.dtype) -> dict[str, int]:
    from fluxspace.models import resolve_paths
    from fluxspace.resources import part_weights

    size = torch.empty((), dtype=dtype).element_size()
    return {part: n * size for part, n in part_weights(resolve_paths(ckpt)).items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        write_json(args.worker_dir / f"{args.worker}.json", result)
        return result

    from flux_core import get_preset
    from weights_tools.random_weights import write_random_checkpoint
    from weights_tools.text_encoders import install_text_encoders

    params = get_preset(args.preset).params
    with tempfile.TemporaryDirectory(prefix="flux-offload-", dir=args.tmp) as tmp:
        folder = Path(tmp) / "ckpt"
        print(f"writing a random {args.preset} checkpoint set ...", file=sys.stderr, flush=True)
        ckpt = write_random_checkpoint(args.preset, folder, dtype=args.dtype, depth=args.depth,
                                       depth_single=args.depth_single, allow_large=True)  # fmt: skip
        install_text_encoders(folder, t5_dim=params.context_in_dim, clip_dim=params.vec_in_dim,
                              t5_max_length=get_preset(args.preset).t5_max_length, num_layers=args.t5_layers)  # fmt: skip
        # The real FLUX.1 text encoders ship in bf16; the random ones are written in float32. Store them in
        # the run's dtype, as the transformer is, so that no load converts (a float32 T5 loaded into bf16
        # holds both copies for a moment).
        for file in [*folder.glob("text_encoder*/*.safetensors")]:
            tensors, meta = load_file(file), safe_open(file, "pt").metadata()
            save_file({k: v.to(getattr(torch, args.dtype)) for k, v in tensors.items()}, file, metadata=meta)
        sizes = part_bytes(ckpt.transformer, getattr(torch, args.dtype))
        results = []
        for mode in MODES:
            print(f"{mode} run ...", file=sys.stderr, flush=True)
            argv_ = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--checkpoint", str(ckpt.transformer),
                     "--worker-dir", tmp, "--dtype", args.dtype, "--size", str(args.size), "--steps", str(args.steps)]  # fmt: skip
            log = Path(tmp) / f"{mode}.log"
            with open(log, "w") as f:
                proc = subprocess.run(argv_, stdout=f, stderr=subprocess.STDOUT, check=False)
            path = Path(tmp) / f"{mode}.json"
            results.append(json.loads(path.read_text()) if path.is_file() else
                           {"mode": mode, "status": "failed", "error": f"exit {proc.returncode}",
                            "traceback": log.read_text()[-2000:]})  # fmt: skip

    largest = max(sizes["text"], sizes["flow"])
    target = TARGET * largest
    by_mode = {r["mode"]: r for r in results}
    staged = by_mode["staged"].get("peak_rss_bytes")
    data = {
        "benchmark": "offload",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "checkpoint", "worker_dir")},  # fmt: skip
        "part_bytes": sizes,
        "target_bytes": target,
        "staged_within_target": staged is not None and staged <= target,
        "machine": machine_info("cpu"),
        "results": results,
    }
    out = args.out or RESULTS / f"offload-cpu-{args.preset}-d{args.depth}s{args.depth_single}-t5x{args.t5_layers}-{args.dtype}-{args.size}px.json"
    write_json(out, data)
    print(f"\nparts in {args.dtype}: text encoders {sizes['text'] / GIB:.2f} GiB, transformer {sizes['flow'] / GIB:.2f} "
          f"GiB, autoencoder {sizes['ae'] / GIB:.2f} GiB; sum {sum(sizes.values()) / GIB:.2f} GiB\n")  # fmt: skip
    print("| run | peak RSS GiB | x max(text, transformer) | run s |\n|---|---|---|---|")
    for r in results:
        if r["status"] != "ok":
            print(f"| {r['mode']} | failed: {r['error']} | | |")
            continue
        print(f"| {r['mode']} | {r['peak_rss_bytes'] / GIB:.2f} | {r['peak_rss_bytes'] / largest:.2f} | {r['run_s']:.1f} |")
    verdict = "yes" if data["staged_within_target"] else "no"
    print(f"\nstaged peak <= max(text encoders, transformer) + 10% ({target / GIB:.2f} GiB): {verdict}")
    print(f"wrote {out}")
    return data


if __name__ == "__main__":
    main()
