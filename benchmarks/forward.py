"""Time one transformer forward: our flux_core.Flux against diffusers' FluxTransformer2DModel.

Same random weights (official layout, seeded), same inputs, same device and dtype; each model eager
and under torch.compile, whole-model and regional (each repeated block compiled once,
flux_core.runtime.compile_blocks; for diffusers its transformer_blocks and single_transformer_blocks
the same way). Prints a markdown table and writes JSON (settings, machine, results).

    python benchmarks/forward.py --preset flux-dev --height 1024 --width 1024 --device cuda
    python benchmarks/forward.py --preset flux-dev --depth 2 --depth-single 4 --height 512 --width 512 \
        --txt-len 128 --warmup 1 --iters 3          # full width, fewer blocks: fits a CPU

How it measures
- Every (model, mode) runs in a fresh subprocess of this script (`--worker`), one after the other,
  so no model's memory, allocator cache or compiled code leaks into another's numbers. The worker
  builds its model on the meta device and assigns the random tensors, so the weights exist once.
  diffusers gets the same official-layout tensors through its own single-file converter
  (`convert_flux_transformer_checkpoint_to_diffusers`, which hard-codes hidden 3072 and MLP ratio 4);
  at other widths (the tiny preset) through our flux_core.formats rename table.
- Time: `--warmup` calls (at least one; the first compiles), then the median of `--iters` calls, under
  torch.inference_mode; CUDA events around each call on a GPU, time.perf_counter on the CPU.
- Memory, after the timed calls, on one more call:
  cuda: torch.cuda.max_memory_allocated, reset just before that call; "weights" is what is allocated
        before it (weights + inputs), "forward" the peak above that.
  cpu:  resident set size from /proc/self/status. The high-water mark VmHWM is reset by writing "5"
        to /proc/self/clear_refs just before the call, so it holds the peak of that call alone;
        "forward" = VmHWM - VmRSS before the call. Beforehand glibc's malloc is told to give freed
        memory back (malloc_trim) and to map every block of 64 KiB or more on its own (mallopt
        M_MMAP_THRESHOLD), so memory freed by earlier calls and kept by the allocator is neither
        hidden in the baseline nor reused unseen. "weights" = VmRSS after building the model and
        inputs - VmRSS after the imports.
- Agreement: each worker saves its output; the table gives ||out - ref|| / ||ref|| (float32) against
  diffusers eager (ours eager when diffusers did not run), so all rows compute the same function.

Failures (e.g. torch.compile without a working compiler) are caught per worker and reported in the
table, never fatal.
"""

import argparse
import ctypes
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from flux_core import Flux, FluxParams, get_preset
from flux_core.atomic import atomic_file
from flux_core.files import DTYPES
from flux_core.presets import PRESETS
from flux_core.sampling import check_image_size
from flux_core.sampling import img_ids as make_img_ids
from flux_core.sampling import txt_ids as make_txt_ids

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("ours", "diffusers")
MODES = ("eager", "compiled", "regional")  # compiled: torch.compile of the whole model
GIB = 1024**3
# glibc mallopt parameter number (malloc.h): blocks at least this large get their own mmap.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024
# The settings a worker needs to rebuild the same model and inputs.
WORKER_FLAGS = tuple(
    "preset depth depth_single height width txt_len batch device dtype warmup iters compile_mode compile_scope threads seed".split()
)
# Inputs of the forward: a mid-trajectory time and the dev default guidance.
TIMESTEP, GUIDANCE = 0.7, 3.5


# ----------------------------------------------------------------------------------------------
# Settings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux-dev", help=f"one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--depth", type=int, help="double-stream blocks (default: the preset's)")
    p.add_argument("--depth-single", type=int, help="single-stream blocks (default: the preset's)")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (multiple of 16)")
    p.add_argument("--txt-len", type=int, help="text tokens (default: the preset's t5_max_length)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed calls before timing, at least 1 (it compiles)"
    )
    p.add_argument("--iters", type=int, default=10, help="timed calls; the table gives their median")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument(
        "--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)"
    )
    p.add_argument("--compile-scope", choices=("whole", "regional", "both"), default="both",
                   help="compile the whole model ('compiled' rows), each block ('regional' rows), or both")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: ours,diffusers")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-timeout", type=float, default=1800, help="seconds before a worker is killed")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/forward-<device>-...)")
    # Internal: run one (model, mode) in this process and write its result into a folder.
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    get_preset(args.preset)  # unknown names fail here, listing the valid ones
    check_image_size(args.height, args.width)
    for name in ("depth", "depth_single", "txt_len"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise ValueError("--batch and --iters must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown --models {sorted(unknown)}; valid: {', '.join(MODELS)}")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.txt_len is None:
        args.txt_len = get_preset(args.preset).t5_max_length
    return args


def model_params(args) -> FluxParams:
    params = get_preset(args.preset).params
    overrides = {}
    if args.depth is not None:
        overrides["depth"] = args.depth
    if args.depth_single is not None:
        overrides["depth_single_blocks"] = args.depth_single
    return dataclasses.replace(params, **overrides)


def parameter_count(params: FluxParams) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Flux(params).parameters())


def default_out(args) -> Path:
    name = f"forward-{args.device}-{args.preset}-{args.height}x{args.width}"
    if args.depth is not None or args.depth_single is not None:
        p = model_params(args)
        name += f"-d{p.depth}s{p.depth_single_blocks}"
    if args.batch != 1:
        name += f"-b{args.batch}"
    if args.threads:
        name += f"-t{args.threads}"
    return RESULTS / f"{name}.json"


# ----------------------------------------------------------------------------------------------
# The two models on the same random weights


def random_official_state_dict(params: FluxParams, seed: int, device, dtype) -> dict[str, torch.Tensor]:
    """Seeded normal weights (std 0.02; RMSNorm scales near 1) in the official layout, tensor by tensor.

    Drawn on `device` from a generator there, so the same seed gives the same tensors in every worker.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    g = torch.Generator(device).manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=device) * 0.02
        if key.endswith(".scale"):
            t = 1.0 + 10 * t
        sd[key] = t.to(dtype)
    return sd


def diffusers_support(params: FluxParams) -> str | None:
    """None if FluxTransformer2DModel can express these params, else why not."""
    if params.mlp_ratio != 4.0 or not params.qkv_bias:
        return "diffusers' Flux blocks are fixed to MLP ratio 4 with qkv biases"
    if params.depth < 1 or params.depth_single_blocks < 1:
        return "the converters need at least one double and one single block"
    return None


def build(model: str, params: FluxParams, sd: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, str]:
    """The model on the meta device with `sd` assigned (no second copy). Returns it and the converter used."""
    if model == "ours":
        with torch.device("meta"):
            net = Flux(params)
        net.load_state_dict(sd, strict=True, assign=True)
        return net.eval(), "none (official layout)"
    from weights_tools.diffusers_reference import diffusers_transformer

    net = diffusers_transformer(params)
    if params.hidden_size == 3072:
        # diffusers' own converter is the independent reference; it hard-codes hidden 3072.
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

        converted, converter = (
            convert_flux_transformer_checkpoint_to_diffusers(sd),
            "diffusers single_file_utils",
        )
    else:
        from flux_core.formats import bfl_to_diffusers_transformer

        converted, converter = bfl_to_diffusers_transformer(sd), "flux_core.formats"
    sd.clear()  # the converters pop or split: drop our references so each tensor lives once
    net.load_state_dict(converted, strict=True, assign=True)
    return net.eval(), converter


def make_inputs(params: FluxParams, args, device, dtype) -> dict[str, torch.Tensor]:
    """Seeded random latents, T5 tokens and CLIP vector; t and guidance in the model dtype, as officially."""
    g = torch.Generator().manual_seed(args.seed + 1)
    B, N, T = args.batch, (args.height // 16) * (args.width // 16), args.txt_len
    return {
        "img": torch.randn(B, N, params.in_channels, generator=g).to(device, dtype),
        "img_ids": make_img_ids(B, args.height, args.width, device=device),
        "txt": torch.randn(B, T, params.context_in_dim, generator=g).to(device, dtype),
        "txt_ids": make_txt_ids(B, T, device=device),
        "timesteps": torch.full((B,), TIMESTEP, device=device, dtype=dtype),
        "y": torch.randn(B, params.vec_in_dim, generator=g).to(device, dtype),
        "guidance": torch.full((B,), GUIDANCE, device=device, dtype=dtype) if params.guidance_embed else None,
    }


def forward_fn(model: str, net, inputs: dict):
    """A no-argument call of `net` on `inputs`, in each library's own argument names."""
    if model == "ours":
        return lambda: net(**inputs)
    kwargs = {
        "hidden_states": inputs["img"],
        "encoder_hidden_states": inputs["txt"],
        "pooled_projections": inputs["y"],
        "timestep": inputs["timesteps"],
        "img_ids": inputs["img_ids"][0],  # diffusers takes (L, 3) ids shared by the batch
        "txt_ids": inputs["txt_ids"][0],
        "guidance": inputs["guidance"],
        "return_dict": False,
    }
    return lambda: net(**kwargs)[0]


# ----------------------------------------------------------------------------------------------
# Timing and memory


def time_calls(fn, device: str, n: int) -> list[float]:
    """Milliseconds of each of n calls."""
    times = []
    for _ in range(n):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_freed_cpu_memory() -> bool:
    """Hand freed heap back to the OS and map large blocks on their own from now on (glibc only)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def reset_rss_peak() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_in_use(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return proc_status_bytes("VmRSS") or 0


def measure_peak(fn, device: str) -> dict:
    """Peak memory of one call of fn above what is in use before it (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"out": out, "before": before, "peak": peak, "method": "torch.cuda.max_memory_allocated"}
    trimmed = release_freed_cpu_memory()
    before = proc_status_bytes("VmRSS")
    if before is None or not reset_rss_peak():
        return {
            "out": fn(),
            "before": before,
            "peak": None,
            "method": "unavailable (needs /proc/self/clear_refs)",
        }
    out = fn()
    method = "VmHWM after clear_refs" + (", glibc trimmed + mmap threshold 64 KiB" if trimmed else "")
    return {"out": out, "before": before, "peak": proc_status_bytes("VmHWM"), "method": method}


# ----------------------------------------------------------------------------------------------
# One (model, mode) in this process


def run_worker(args) -> dict:
    model, mode = args.worker.split(":")
    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    params = model_params(args)
    result = {"model": model, "mode": mode, "status": "ok", "torch_threads": torch.get_num_threads()}
    # Other processes on the machine distort CPU timings: keep the load average beside them.
    result["loadavg_start"] = os.getloadavg()[0]
    try:
        if model == "diffusers":  # imported before the baseline, like torch
            import diffusers.loaders.single_file_utils  # noqa: F401
            from diffusers import FluxTransformer2DModel  # noqa: F401
        if device == "cuda":
            torch.cuda.init()
        gc.collect()
        baseline = memory_in_use(device)
        with torch.inference_mode():
            net, result["converter"] = build(
                model, params, random_official_state_dict(params, args.seed, device, dtype)
            )
            inputs = make_inputs(params, args, device, dtype)
            gc.collect()
            result["weights_bytes"] = memory_in_use(device) - baseline
            compile_mode = None if args.compile_mode == "default" else args.compile_mode
            if mode == "compiled":
                net = torch.compile(net, mode=compile_mode)
            elif mode == "regional":
                compile_regions(model, net, mode=compile_mode)
            fn = forward_fn(model, net, inputs)
            t0 = time.perf_counter()
            time_calls(fn, device, 1)
            result["first_call_s"] = time.perf_counter() - t0
            time_calls(fn, device, max(0, args.warmup - 1))
            times = time_calls(fn, device, args.iters)
            mem = measure_peak(fn, device)
        result.update(
            times_ms=times,
            median_ms=statistics.median(times),
            min_ms=min(times),
            memory_method=mem["method"],
            forward_peak_bytes=None if mem["peak"] is None else mem["peak"] - mem["before"],
            total_peak_bytes=mem["peak"] if device == "cuda" else None,
            loadavg_end=os.getloadavg()[0],
        )
        # The output for compare_outputs in the parent: safetensors, so reading it runs no pickle.
        with atomic_file(args.worker_dir / f"{model}-{mode}.safetensors") as f:
            f.write(safetensors.torch.save({"out": mem["out"].float().cpu().contiguous()}))
    except Exception as e:  # a benchmark reports what failed (e.g. compile on CPU) and goes on
        result.update(status="failed", error=f"{type(e).__name__}: {first_line(str(e))}")
        result["traceback"] = traceback.format_exc()[-4000:]
    return result


def compile_regions(model: str, net, **compile_kwargs) -> None:
    """Each repeated block compiled once, in place: ours through flux_core.runtime, diffusers' alike."""
    if model == "ours":
        from flux_core.runtime import compile_blocks

        compile_blocks(net, **compile_kwargs)
    else:
        for block in [*net.transformer_blocks, *net.single_transformer_blocks]:
            block.compile(**compile_kwargs)


def first_line(text: str, limit: int = 300) -> str:
    lines = [s.strip() for s in text.strip().splitlines() if s.strip()]
    return (lines[0] if lines else "")[:limit]


# ----------------------------------------------------------------------------------------------
# The parent: one worker per row, then the table


def worker_argv(args, model: str, mode: str, folder: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve())]
    for name in WORKER_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv + ["--worker", f"{model}:{mode}", "--worker-dir", str(folder)]


def run_in_subprocess(args, model: str, mode: str, folder: Path) -> dict:
    log = folder / f"{model}-{mode}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                worker_argv(args, model, mode, folder),
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=args.worker_timeout,
                check=False,
            )
    except subprocess.TimeoutExpired:
        return {
            "model": model,
            "mode": mode,
            "status": "failed",
            "error": f"timed out after {args.worker_timeout:.0f} s",
        }
    path = folder / f"{model}-{mode}.json"
    if path.is_file():
        return json.loads(path.read_text())
    tail = log.read_text()[-2000:]
    return {
        "model": model,
        "mode": mode,
        "status": "failed",
        "error": f"worker exited with code {proc.returncode}",
        "traceback": tail,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def compare_outputs(results: list[dict], folder: Path) -> str | None:
    """Add each row's error against the reference output; return the reference's name."""
    outputs = {}
    for r in results:
        path = folder / f"{r['model']}-{r['mode']}.safetensors"
        if r["status"] == "ok" and path.is_file():
            outputs[(r["model"], r["mode"])] = safetensors.torch.load_file(path)["out"]
    ref_key = next((k for k in (("diffusers", "eager"), ("ours", "eager")) if k in outputs), None)
    for r in results:
        out = outputs.get((r["model"], r["mode"]))
        if ref_key is not None and out is not None:
            ref = outputs[ref_key]
            r["rel_err"] = rel_err(out, ref)
            r["max_abs_err"] = (out - ref).abs().max().item()
            r["output_rms"] = out.pow(2).mean().sqrt().item()
    return None if ref_key is None else " ".join(ref_key)


def machine_info(device: str) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["diffusers"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        info["diffusers"] = None
    if device == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory,
        )
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(results: list[dict], reference: str | None) -> str:
    lines = [
        "| model | mode | median ms | min ms | x diffusers eager | first call s | weights GiB "
        f"| forward peak GiB | rel err vs {reference or '-'} | status |",
        "|---" * 10 + "|",
    ]
    for r in results:
        weights, peak = r.get("weights_bytes"), r.get("forward_peak_bytes")
        cells = [
            r["model"],
            r["mode"],
            fmt(r.get("median_ms"), ".1f"),
            fmt(r.get("min_ms"), ".1f"),
            fmt(r.get("ratio_to_diffusers_eager"), ".3f"),
            fmt(r.get("first_call_s"), ".1f"),
            fmt(None if weights is None else weights / GIB, ".2f"),
            fmt(None if peak is None else peak / GIB, ".3f"),
            fmt(r.get("rel_err"), ".1e"),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}".replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """Atomic: a temp file in the same folder, then a rename (fluxspace.images.atomic_file)."""
    with atomic_file(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        write_json(args.worker_dir / f"{args.worker.replace(':', '-')}.json", result)
        return result

    params = model_params(args)
    scopes = {"whole": ["compiled"], "regional": ["regional"], "both": ["compiled", "regional"]}[args.compile_scope]
    modes = ["eager"] if args.no_compile else ["eager", *scopes]
    models = [m for m in MODELS if m in args.models.split(",")]
    unsupported = diffusers_support(params)
    results = []
    with tempfile.TemporaryDirectory(prefix="flux-forward-") as tmp:
        folder = Path(tmp)
        for model in models:
            for mode in modes:
                if model == "diffusers" and unsupported:
                    results.append({"model": model, "mode": mode, "status": "skipped", "error": unsupported})
                    continue
                print(f"running {model} {mode} ...", file=sys.stderr, flush=True)
                results.append(run_in_subprocess(args, model, mode, folder))
        reference = compare_outputs(results, folder)
    base = next(
        (r.get("median_ms") for r in results if (r["model"], r["mode"]) == ("diffusers", "eager")), None
    )
    for r in results:
        if r.get("median_ms") is not None and base:
            r["ratio_to_diffusers_eager"] = r["median_ms"] / base

    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("worker")
    }
    settings.update(
        image_tokens=(args.height // 16) * (args.width // 16),
        txt_tokens=args.txt_len,
        params=dataclasses.asdict(params),
        parameters=parameter_count(params),
        timestep=TIMESTEP,
        guidance=GUIDANCE if params.guidance_embed else None,
    )
    data = {
        "benchmark": "forward",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "machine": machine_info(args.device),
        "reference": reference,
        "results": results,
    }
    out = args.out or default_out(args)
    write_json(out, data)
    data["table"] = table(results, reference)
    print(
        f"\n{args.preset} (depth {params.depth}+{params.depth_single_blocks}), {args.height}x{args.width} "
        f"({settings['image_tokens']} image + {args.txt_len} text tokens), batch {args.batch}, "
        f"{args.device} {args.dtype}, median of {args.iters}\n"
    )
    print(data["table"])
    loads = [r[k] for r in results for k in ("loadavg_start", "loadavg_end") if k in r]
    if args.device == "cpu" and loads:
        threads = max(r.get("torch_threads", 1) for r in results)
        print(
            f"\n1-min load average during the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs; "
            f"a worker alone adds about {threads} (one per thread); more means other processes competed"
        )
    print(f"\nwrote {out}")
    return data


if __name__ == "__main__":
    main()
