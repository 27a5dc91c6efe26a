"""Memory of loading a transformer checkpoint with flux_core.load_flow_model (FLUX.2: load_flux2_model).

Writes a random checkpoint in the official layout (weights_tools.random_weights, tensor by tensor)
to a temporary folder, then loads it once per target dtype, each time in a fresh subprocess, and
compares the memory the load took with the size of the model in that dtype. The point: loading
takes about one model in the target dtype (no float32 copy of a bf16 model, no second copy).

    python benchmarks/load_memory.py --preset flux-dev --depth 2 --depth-single 4     # CPU-sized
    python benchmarks/load_memory.py --preset flux-dev --device cuda                  # the 12B file
    python benchmarks/load_memory.py --preset flux2-klein-4b                          # FLUX.2 [klein] 4B, whole

What the worker reports (all relative to its own state after the imports):
- peak RSS: VmHWM of /proc/self/status after the load minus VmRSS before it; the high-water mark
  is reset just before the load (writing "5" to /proc/self/clear_refs), so import peaks do not
  count. (getrusage's ru_maxrss is kept in the JSON as `ru_maxrss_delta_bytes`, but it is only an
  upper bound: the kernel folds in the peak of threads that exited before the reset, e.g. the
  ~0.5 GiB transient of `import torch`.) RSS counts the checkpoint's pages that the load touched
  through its memory map (clean page cache, which the kernel can drop), so it also gives:
- peak anonymous memory: RssAnon of /proc/self/status sampled every 2 ms during the load: the
  memory the load really allocated.
- after the load and after touching every page of every weight: RssAnon and RssFile. A load in the
  file's dtype on the CPU is zero-copy (the tensors are views of the memory map): nothing is read
  until used, and then the weights are file pages, not allocations.
- on cuda also torch.cuda.max_memory_allocated during the load.
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import machine_info, reset_rss_peak, write_json  # noqa: E402  (the shared harness)

from flux_core.files import DTYPES as ALL_DTYPES  # noqa: E402
from flux_core.flux2.loading import load_flux2_model  # noqa: E402
from flux_core.loading import load_flow_model  # noqa: E402
from flux_core.presets import PRESETS, get_preset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The dtypes measured, files and loads (weights_tools.random_weights writes files in these two).
DTYPES = {name: ALL_DTYPES[name] for name in ("float32", "bfloat16")}
GIB = 1024**3
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SAMPLE_S = 0.002


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux-dev", help=f"one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--depth", type=int, help="double-stream blocks (default: the preset's)")
    p.add_argument("--depth-single", type=int, help="single-stream blocks (default: the preset's)")
    p.add_argument(
        "--file-dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the written file"
    )
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated target dtypes to load into")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", type=Path, help="folder for the temporary checkpoint (default: the system's)")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/load_memory-...)")
    # Internal: load `--checkpoint` into one dtype in this process.
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    get_preset(args.preset)  # unknown names fail here, listing the valid ones
    unknown = set(args.dtypes.split(",")) - set(DTYPES)
    if unknown:
        raise ValueError(f"unknown --dtypes {sorted(unknown)}; valid: {', '.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
    return args


def default_out(args) -> Path:
    name = f"load_memory-{args.device}-{args.preset}"
    if args.depth is not None or args.depth_single is not None:
        params = get_preset(args.preset).params
        depth = params.depth if args.depth is None else args.depth
        single = params.depth_single_blocks if args.depth_single is None else args.depth_single
        name += f"-d{depth}s{single}"
    return RESULTS / f"{name}-{args.file_dtype}-file.json"


# ----------------------------------------------------------------------------------------------
# Memory readings of this process


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of /proc/self/status in bytes (empty off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def ru_maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakSampler(threading.Thread):
    """Largest RssAnon and RssFile seen while running (every SAMPLE_S seconds)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._done = threading.Event()

    def sample(self) -> None:
        now = proc_status()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now.get(key, 0))

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(SAMPLE_S)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        self.sample()
        return self.peak


def touch_every_page(model: torch.nn.Module) -> None:
    """Read one element per page of every weight, so lazily mapped weights become resident."""
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        flat[:: max(1, PAGE // p.element_size())].sum().item()


# ----------------------------------------------------------------------------------------------
# One load in this process


def run_worker(args) -> dict:
    dtype = DTYPES[args.worker]
    result = {"target_dtype": args.worker, "device": args.device, "status": "ok"}
    try:
        import flux_core.formats  # noqa: F401  (the loader imports it lazily: keep it out of the numbers)

        if args.device == "cuda":
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        gc.collect()
        before = proc_status()
        result["peak_method"] = "VmHWM after clear_refs" if reset_rss_peak() else "VmHWM since start"
        sampler = PeakSampler()
        sampler.start()
        t0 = time.perf_counter()
        load = load_flux2_model if get_preset(args.preset).family == "flux2" else load_flow_model
        model = load(args.checkpoint, device=args.device, dtype=dtype)
        if args.device == "cuda":
            torch.cuda.synchronize()
        result["load_s"] = time.perf_counter() - t0
        peak = sampler.stop()
        after = proc_status()
        result["peak_rss_bytes"] = after["VmHWM"] - before["VmRSS"]
        result["ru_maxrss_delta_bytes"] = ru_maxrss_bytes() - before["VmRSS"]
        result["peak_anon_bytes"] = peak["RssAnon"] - before["RssAnon"]
        result["peak_file_bytes"] = peak["RssFile"] - before["RssFile"]
        result["after_load_anon_bytes"] = after["RssAnon"] - before["RssAnon"]
        result["after_load_file_bytes"] = after["RssFile"] - before["RssFile"]
        if args.device == "cuda":
            result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
            result["gpu_after_load_bytes"] = torch.cuda.memory_allocated()
        else:
            touch_every_page(model)
            touched = proc_status()
            result["after_touch_anon_bytes"] = touched["RssAnon"] - before["RssAnon"]
            result["after_touch_file_bytes"] = touched["RssFile"] - before["RssFile"]
        result["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["loaded_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    except Exception as e:  # report what failed and go on with the other dtypes
        result.update(status="failed", error=f"{type(e).__name__}: {str(e).strip()[:300]}")
        result["traceback"] = traceback.format_exc()[-4000:]
    return result


# ----------------------------------------------------------------------------------------------
# The parent: write the file, one worker per target dtype, the table


def run_in_subprocess(args, dtype: str, checkpoint: Path, folder: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--device", args.device]
    argv += ["--worker", dtype, "--checkpoint", str(checkpoint), "--worker-dir", str(folder)]
    log = folder / f"{dtype}.log"
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False)
    path = folder / f"{dtype}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {
        "target_dtype": dtype,
        "status": "failed",
        "error": f"worker exited with code {proc.returncode}",
        "traceback": log.read_text()[-2000:],
    }


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def with_ratio(n, model_bytes) -> str:
    return "-" if n is None or not model_bytes else f"{gib(n)} ({n / model_bytes:.2f}x)"


def table(results: list[dict], file_bytes: int) -> str:
    cuda = any("gpu_peak_bytes" in r for r in results)
    head = "| target dtype | model GiB | file GiB | load s | peak RSS GiB | peak anon GiB | after load anon / file GiB "
    head += "| GPU peak GiB |" if cuda else "| after touching weights anon / file GiB |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['target_dtype']} | failed: {r.get('error', '')} |")
            continue
        m = r["model_bytes"]
        last = (
            with_ratio(r.get("gpu_peak_bytes"), m)
            if cuda
            else f"{gib(r['after_touch_anon_bytes'])} / {gib(r['after_touch_file_bytes'])}"
        )
        lines.append(
            f"| {r['target_dtype']} | {gib(m)} | {gib(file_bytes)} | {r['load_s']:.1f} "
            f"| {with_ratio(r['peak_rss_bytes'], m)} | {with_ratio(r['peak_anon_bytes'], m)} "
            f"| {gib(r['after_load_anon_bytes'])} / {gib(r['after_load_file_bytes'])} | {last} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        write_json(args.worker_dir / f"{args.worker}.json", result)
        return result

    from weights_tools.random_weights import write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="flux-load-memory-", dir=args.tmp) as tmp:
        folder = Path(tmp)
        print(
            f"writing a random {args.preset} checkpoint ({args.file_dtype}) ...", file=sys.stderr, flush=True
        )
        t0 = time.perf_counter()
        ckpt = write_random_checkpoint(
            args.preset,
            folder / "ckpt",
            seed=args.seed,
            dtype=args.file_dtype,
            transformer_only=True,
            depth=args.depth,
            depth_single=args.depth_single,
            allow_large=True,  # the benchmark measures the full-size load
        )
        write_s = time.perf_counter() - t0
        file_bytes = ckpt.transformer.stat().st_size
        results = []
        for dtype in args.dtypes.split(","):
            print(f"loading into {dtype} on {args.device} ...", file=sys.stderr, flush=True)
            results.append(run_in_subprocess(args, dtype, ckpt.transformer, folder))

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for key in ("worker", "checkpoint", "worker_dir"):
        settings.pop(key)
    data = {
        "benchmark": "load_memory",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "checkpoint": {"file_bytes": file_bytes, "file_name": ckpt.transformer.name, "write_s": write_s},
        "machine": machine_info(args.device),
        "results": results,
    }
    out = args.out or default_out(args)
    write_json(out, data)
    data["table"] = table(results, file_bytes)
    print(
        f"\n{ckpt.transformer.name}: {file_bytes / GIB:.2f} GiB ({args.file_dtype}), loaded on {args.device}\n"
    )
    print(data["table"])
    print(f"\nwrote {out}")
    return data


if __name__ == "__main__":
    main()
