"""Peak memory and speed of one FluxSpace edit under each residency mode (fluxspace/runtime.py).

Writes, once, a random checkpoint set in the official layout to a temporary folder: the transformer
of --preset (full depth unless --depth / --depth-single), its autoencoder (float32, as shipped),
and random text encoders at the preset's widths (for FLUX.1: T5-XXL 4096 wide, d_ff 10240, 64 heads
of 64, --t5-layers layers, 24 = the real T5-XXL; CLIP-L 768 wide, 12 heads, --clip-layers layers)
stored in bf16 like the real ones. Then, for each mode of --modes, in a fresh subprocess:

    load_models(ckpt, device=..., dtype=..., weights=..., offload=..., text_device=...)
    edit_image(models, PROMPT, EditSpec(concepts=(Concept("eyeglasses", 5.0, tau_m=0.5),),
               lambda_coarse=0.5), seed=0, settings=SampleSettings(width=S, height=S, steps=N))

and reports the peak memory of load + edit, the load and edit wall times, and the time of every
denoising step. An edit_image is two runs: the plain image (N plain steps) and, since this edit is
on from step 0, the edited one (N FluxSpace steps).

    python benchmarks/runtime_modes.py --device cuda --steps 4        # flux-dev, 1024 px, on a GPU
    python benchmarks/runtime_modes.py --preset tiny --size 64 --steps 2 --device cpu --modes none,model

Modes: an offload policy, none | model | blocks, optionally followed by +fp8 (weights="fp8"),
+text-cpu (text_device="cpu") and +staged (staged=True): e.g. `model+fp8`, `blocks+fp8+text-cpu`.
`blocks` needs CUDA (the library refuses it elsewhere): on the CPU those modes are skipped with a note.

How it measures
- Memory. CUDA: torch.cuda.max_memory_allocated and max_memory_reserved, the counters reset at the
  start (a fresh process: nothing allocated before the load) and again between load and edit, so
  the JSON has both phases; the table gives the peak of the two. Reserved is what the caching
  allocator held from the driver, i.e. what the card must have (plus the CUDA context, ~0.5 GiB,
  which neither counts). CPU: resident set size, VmHWM of /proc/self/status minus VmRSS after the
  imports, the high-water mark reset just before the load (as benchmarks/offload.py does).
- Time. Every step is timed around the model call (fluxspace.run's euler is wrapped; on CUDA with
  torch.cuda.synchronize before and after, which also waits for the block-streaming side stream).
  `plain step` / `edit step` are medians over the steps after each run's first (the first carries
  one-off costs: compiling, moving the transformer to the GPU under `model` offload); with one step
  only that step. `est 28-step edit s` = the edit's wall time - all its step times + the two first
  steps + 27 x (plain + edit median): what the same edit at 28 steps would take.
- Targets (FLUX.1-dev shape at 1024 x 1024, on CUDA; "GB" read as GiB, what a "24 GB" card holds):
  model (bf16) <= 24, model+fp8 <= 16, blocks <= 10 GiB peak; blocks step <= 1.5 x the resident
  (`none`) step of the same weights format. On another shape or device the verdicts are printed
  but only indicative.

Writing the checkpoint (33.6 GB for flux-dev with a 24-layer T5) runs in its own subprocess, every
tensor drawn from its own seeded generator as weights_tools.random_weights does, but on the GPU
when --device is cuda (same layout and distribution, other values); its time is reported. With
--checkpoint-dir DIR the set is kept in DIR and reused by a later run with the same settings.
"""

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import (  # noqa: E402
    RESULTS,
    machine_info,
    proc_status_bytes,
    release_freed_cpu_memory,
    reset_rss_peak,
    write_json,
)

GIB = 1024**3
PROMPT = "a portrait photo of a man in a park"
EDIT_PROMPT = "eyeglasses"
OFFLOADS = ("none", "model", "blocks")
FLAGS = ("fp8", "text-cpu", "staged")
DEFAULT_MODES = "none,model,model+fp8,blocks"
TARGET_STEPS = 28
# GPU targets (GiB) of peak memory, by mode; and the blocks/resident step-time ratio.
MEMORY_TARGETS_GIB = {"model": 24.0, "model+fp8": 16.0, "blocks": 10.0, "blocks+fp8": 10.0}
BLOCKS_SLOWDOWN_TARGET = 1.5
TARGET_SHAPE = {"preset": "flux-dev", "size": 1024, "device": "cuda", "depth": None, "depth_single": None}
# The parts of the checkpoint set, for the settings file that lets --checkpoint-dir reuse it.
CKPT_KEYS = ("preset", "depth", "depth_single", "t5_layers", "clip_layers", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux-dev")
    p.add_argument("--depth", type=int, help="double-stream blocks (default: the preset's)")
    p.add_argument("--depth-single", type=int, help="single-stream blocks (default: the preset's)")
    p.add_argument("--t5-layers", type=int, default=24, help="layers of the random T5 (24: T5-XXL)")
    p.add_argument(
        "--clip-layers", type=int, default=12, help="layers of the random CLIP text model (12: CLIP-L)"
    )
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help=f"comma-separated: none|model|blocks, each optionally +fp8, +text-cpu, +staged (default {DEFAULT_MODES})")  # fmt: skip
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument(
        "--steps",
        type=int,
        default=TARGET_STEPS,
        help="denoising steps (fewer saves time: per-step times are reported)",
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--compile", action="store_true", help="load_models(compile=True) in every mode")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--tmp", type=Path, help="where the temporary checkpoint set is written (default: the system's)"
    )
    p.add_argument(
        "--checkpoint-dir", type=Path, help="keep the checkpoint set here and reuse it if it matches"
    )
    p.add_argument("--worker-timeout", type=float, default=1200, help="seconds before a subprocess is killed")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", choices=["write", "run"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    offload: str
    fp8: bool = False
    text_cpu: bool = False
    staged: bool = False

    @property
    def weights(self) -> str:
        return "fp8" if self.fp8 else "full"


def parse_mode(text: str) -> Mode:
    parts = text.strip().split("+")
    offload, flags = parts[0], parts[1:]
    if offload not in OFFLOADS:
        raise SystemExit(f"mode {text!r}: offload must be one of {', '.join(OFFLOADS)}")
    for f in flags:
        if f not in FLAGS:
            raise SystemExit(f"mode {text!r}: unknown flag {f!r}; valid: {', '.join(FLAGS)}")
    return Mode(text.strip(), offload, "fp8" in flags, "text-cpu" in flags, "staged" in flags)


# ----------------------------------------------------------------------------------------------
# Writing the checkpoint set


def fast_random_tensor_factory(device: str):
    """weights_tools.random_weights.random_tensor, drawn on `device` (a GPU draws 12B values in seconds)."""
    import torch

    from weights_tools import random_weights as rw

    def random_tensor(key, shape, seed, dtype=torch.float32):
        g = torch.Generator(device=device).manual_seed(rw.tensor_seed(seed, key))
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * rw.WEIGHT_STD
        if rw.is_norm_scale(key, tuple(shape)):
            t += 1.0
        return t.to(dtype)

    return random_tensor


def block_pattern(key: str) -> str:
    """A key with its layer index replaced by 0 (T5 encoder.block.N., CLIP encoder.layers.N.)."""
    return re.sub(r"\.(block|layers)\.\d+\.", r".\1.0.", key)


def write_text_encoder(folder: Path, cls, config_updates: dict, seed: int, random_tensor, dtype) -> None:
    """Rewrite a random HF text-encoder folder at another depth / head count, its weights in `dtype`.

    The folder (written by weights_tools.text_encoders with one layer) gives the key set that
    save_pretrained writes (tied copies left out); the new config's meta-device model the shapes.
    """
    import torch
    from safetensors import safe_open

    from weights_tools.convert import write_safetensors

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update(config_updates, dtype=str(dtype).removeprefix("torch."))
    weights = folder / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        saved = {block_pattern(k) for k in f.keys()}
    hf_config = cls.config_class.from_dict(config)
    with torch.device("meta"):
        model = cls(hf_config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if block_pattern(k) in saved}
    missing = saved - {block_pattern(k) for k in shapes}
    if missing:
        raise RuntimeError(f"{folder.name}: the meta model lacks saved keys {sorted(missing)[:5]}")
    plan = [(k, shapes[k], dtype) for k in sorted(shapes)]
    tensors = ((k, random_tensor(k, shapes[k], seed, dtype)) for k in sorted(shapes))
    write_safetensors(weights, plan, tensors, metadata={"format": "pt"}, force=True)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def heads_for(width: int, fallback: int) -> int:
    """64-wide heads as in T5-XXL and CLIP-L, where the width allows."""
    return width // 64 if width % 64 == 0 and width >= 64 else fallback


def run_writer(args) -> dict:
    import torch
    from transformers import CLIPTextModel, T5EncoderModel

    from flux_core import get_preset
    from weights_tools import random_weights as rw
    from weights_tools.text_encoders import install_text_encoders

    device = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    folder = args.folder
    preset = get_preset(args.preset)
    params = preset.params
    random_tensor = fast_random_tensor_factory(device)
    result = {"draw_device": device, "status": "ok"}
    t0 = time.perf_counter()
    original = rw.random_tensor
    rw.random_tensor = random_tensor  # write_random_file looks it up at call time
    try:
        ckpt = rw.write_random_checkpoint(args.preset, folder, seed=args.seed, dtype="bfloat16", depth=args.depth,
                                          depth_single=args.depth_single, force=True, allow_large=True)  # fmt: skip
    finally:
        rw.random_tensor = original
    result["transformer_ae_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    # One-layer encoders give the folders (tokenizers, configs, key sets); then the real depth in bf16.
    install_text_encoders(folder, overwrite=True, t5_dim=params.context_in_dim, clip_dim=params.vec_in_dim,
                          t5_max_length=preset.t5_max_length, seed=args.seed, num_layers=1)  # fmt: skip
    t5_heads = heads_for(params.context_in_dim, 2)
    write_text_encoder(folder / "text_encoder_2", T5EncoderModel,
                       {"num_layers": args.t5_layers, "num_heads": t5_heads, "d_kv": params.context_in_dim // t5_heads},
                       args.seed, random_tensor, torch.bfloat16)  # fmt: skip
    write_text_encoder(folder / "text_encoder", CLIPTextModel,
                       {"num_hidden_layers": args.clip_layers, "num_attention_heads": heads_for(params.vec_in_dim, 2)},
                       args.seed, random_tensor, torch.bfloat16)  # fmt: skip
    result["text_encoders_s"] = time.perf_counter() - t1
    result["write_s"] = time.perf_counter() - t0
    result["transformer"] = str(ckpt.transformer)
    result["file_bytes"] = {
        str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*.safetensors"))
    }
    return result


def expected_bytes(args) -> int:
    """What the checkpoint set will take on disk, roughly (bf16 transformer and encoders, fp32 AE)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_core import get_preset
    from flux_core.autoencoder import AutoEncoder
    from flux_core.model import Flux

    p = get_preset(args.preset)
    params = dataclasses.replace(
        p.params,
        depth=p.params.depth if args.depth is None else args.depth,
        depth_single_blocks=p.params.depth_single_blocks if args.depth_single is None else args.depth_single,
    )
    d, c = params.context_in_dim, params.vec_in_dim
    with torch.device("meta"):
        flow = sum(v.numel() for v in Flux(params).state_dict().values())
        ae = sum(v.numel() for v in AutoEncoder(p.ae_params).state_dict().values())
        t5 = sum(v.numel() for v in T5EncoderModel(T5Config(d_model=d, d_kv=d // heads_for(d, 2), d_ff=5 * d // 2, num_heads=heads_for(d, 2),
                                                            num_layers=args.t5_layers, vocab_size=1000, feed_forward_proj="gated-gelu")).parameters())  # fmt: skip
        clip = sum(v.numel() for v in CLIPTextModel(CLIPTextConfig(hidden_size=c, intermediate_size=4 * c, num_hidden_layers=args.clip_layers,
                                                                   num_attention_heads=heads_for(c, 2), vocab_size=1024,
                                                                   bos_token_id=0, eos_token_id=1, pad_token_id=1)).parameters())  # fmt: skip
    return 2 * (flow + t5 + clip) + 4 * ae


# ----------------------------------------------------------------------------------------------
# One mode


def run_mode(args) -> dict:
    import numpy as np
    import torch

    mode = parse_mode(args.mode)
    result = {"mode": mode.name, "offload": mode.offload, "weights": mode.weights, "text_device": "cpu" if mode.text_cpu else None,
              "staged": mode.staged, "compile": args.compile, "status": "ok"}  # fmt: skip
    cuda = args.device == "cuda"
    try:
        import transformers  # noqa: F401  (imported before the baseline: not part of the run's memory)

        import fluxspace.run
        from fluxspace import Concept, EditSpec, SampleSettings, edit_image, load_models

        runs: list[list[float]] = []
        original_euler = fluxspace.run.euler

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def timed_euler(velocity, img, timesteps, **kwargs):
            times: list[float] = []
            runs.append(times)

            def timed(x, t, step):
                sync()
                t0 = time.perf_counter()
                out = velocity(x, t, step)
                sync()
                times.append(time.perf_counter() - t0)
                return out

            return original_euler(timed, img, timesteps, **kwargs)

        fluxspace.run.euler = timed_euler

        if cuda:
            torch.cuda.reset_peak_memory_stats()
            result["peak_method"] = "torch.cuda.max_memory_allocated / max_memory_reserved"
        else:
            result["malloc_tuned"] = release_freed_cpu_memory()
            before = proc_status_bytes("VmRSS")
            result["peak_method"] = "VmHWM after clear_refs" if reset_rss_peak() else "VmHWM since start"

        def peaks(phase: str) -> None:
            if cuda:
                result[f"{phase}_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
                result[f"{phase}_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
                torch.cuda.reset_peak_memory_stats()
            else:
                result[f"{phase}_peak_rss_bytes"] = proc_status_bytes("VmHWM") - before
                reset_rss_peak()

        t0 = time.perf_counter()
        models = load_models(args.folder, device=args.device, dtype=args.dtype, weights=mode.weights, offload=mode.offload,
                             text_device="cpu" if mode.text_cpu else None, staged=mode.staged, compile=args.compile)  # fmt: skip
        sync()
        result["load_s"] = time.perf_counter() - t0
        peaks("load")
        if cuda:
            result["after_load_allocated_bytes"] = torch.cuda.memory_allocated()
        spec = EditSpec(concepts=(Concept(EDIT_PROMPT, 5.0, tau_m=0.5),), lambda_coarse=0.5)
        settings = SampleSettings(width=args.size, height=args.size, steps=args.steps)
        t0 = time.perf_counter()
        edited = edit_image(models, PROMPT, spec, seed=0, settings=settings, progress=False)
        sync()
        result["edit_s"] = time.perf_counter() - t0
        peaks("edit")
        fluxspace.run.euler = original_euler
        if cuda:
            result["peak_allocated_bytes"] = max(
                result["load_peak_allocated_bytes"], result["edit_peak_allocated_bytes"]
            )
            result["peak_reserved_bytes"] = max(
                result["load_peak_reserved_bytes"], result["edit_peak_reserved_bytes"]
            )
        else:
            result["peak_rss_bytes"] = max(result["load_peak_rss_bytes"], result["edit_peak_rss_bytes"])
        result["loads"] = dict(getattr(models.runtime, "loads", {}) or {})
        result["step_runs"] = runs
        if len(runs) == 2:
            result.update(step_stats(runs[0], runs[1], result["edit_s"]))
        else:
            result["note"] = f"expected 2 denoising runs (plain, edited), timed {len(runs)}"
        # A black or constant image would mean the run computed nothing useful; random weights give noise.
        result["image_std"] = [
            float(np.asarray(im, dtype=np.float32).std()) for im in (edited.original, edited.edited)
        ]
    except Exception as e:
        result.update(status="failed", error=f"{type(e).__name__}: {str(e).strip()[:400]}")
        result["traceback"] = traceback.format_exc()[-4000:]
    return result


def warm_median(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def step_stats(plain: list[float], edit: list[float], edit_s: float) -> dict:
    plain_med, edit_med = warm_median(plain), warm_median(edit)
    fixed = edit_s - sum(plain) - sum(edit) + plain[0] + edit[0]
    return {
        "plain_step_s": plain_med,
        "edit_step_s": edit_med,
        "plain_first_step_s": plain[0],
        "edit_first_step_s": edit[0],
        "edit_over_plain": edit_med / plain_med,
        "outside_steps_s": edit_s - sum(plain) - sum(edit),
        f"est_{TARGET_STEPS}_step_edit_s": fixed + (TARGET_STEPS - 1) * (plain_med + edit_med),
    }


# ----------------------------------------------------------------------------------------------
# Driver


def subprocess_json(argv: list[str], result_path: Path, log: Path, timeout: float, fallback: dict) -> dict:
    try:
        with open(log, "w") as f:
            proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = f"killed after {timeout:.0f} s"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {
        **fallback,
        "status": "failed",
        "error": f"subprocess exit {rc}",
        "traceback": log.read_text()[-3000:],
    }


def common_argv(args) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--device", args.device,
            "--dtype", args.dtype, "--size", str(args.size), "--steps", str(args.steps), "--seed", str(args.seed),
            "--t5-layers", str(args.t5_layers), "--clip-layers", str(args.clip_layers)]  # fmt: skip
    for flag, value in (("--depth", args.depth), ("--depth-single", args.depth_single)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--compile"] if args.compile else [])


def ckpt_settings(args) -> dict:
    return {k: getattr(args, k) for k in CKPT_KEYS}


def prepare_checkpoint(args, folder: Path, work: Path) -> dict:
    """Write the set into `folder` in a subprocess (or reuse a matching one); the writer's JSON."""
    marker = folder / "runtime_modes.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("settings") == ckpt_settings(args):
            print(f"reusing the checkpoint set in {folder}", file=sys.stderr, flush=True)
            return {**saved["writer"], "reused": True}
        shutil.rmtree(folder)
    need = expected_bytes(args)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need * 1.05:
        raise SystemExit(
            f"{folder}: {free / GIB:.1f} GiB free, the checkpoint set needs {need / GIB:.1f} GiB (pass --tmp)"
        )
    print(
        f"writing a random {args.preset} checkpoint set ({need / 1e9:.1f} GB) to {folder} ...",
        file=sys.stderr,
        flush=True,
    )
    argv = common_argv(args) + [
        "--worker",
        "write",
        "--folder",
        str(folder),
        "--result",
        str(work / "write.json"),
    ]
    writer = subprocess_json(
        argv, work / "write.json", work / "write.log", args.worker_timeout, {"worker": "write"}
    )
    if writer["status"] != "ok":
        raise SystemExit(
            f"writing the checkpoint failed: {writer.get('error')}\n{writer.get('traceback', '')}"
        )
    marker.write_text(json.dumps({"settings": ckpt_settings(args), "writer": writer}, indent=2))
    print(
        f"  written in {writer['write_s']:.1f} s (drawn on {writer['draw_device']})",
        file=sys.stderr,
        flush=True,
    )
    return writer


def run_modes(args, modes: list[Mode], folder: Path, work: Path) -> list[dict]:
    results = []
    for mode in modes:
        print(f"{mode.name} ...", file=sys.stderr, flush=True)
        tag = mode.name.replace("+", "_")
        path = work / f"run-{tag}.json"
        argv = common_argv(args) + [
            "--worker",
            "run",
            "--mode",
            mode.name,
            "--folder",
            str(folder),
            "--result",
            str(path),
        ]
        t0 = time.perf_counter()
        r = subprocess_json(argv, path, work / f"run-{tag}.log", args.worker_timeout, {"mode": mode.name})
        r["subprocess_s"] = time.perf_counter() - t0
        results.append(r)
        if r["status"] != "ok":
            print(f"  failed: {r.get('error')}", file=sys.stderr, flush=True)
    return results


def peak_bytes(r: dict) -> int | None:
    return r.get("peak_reserved_bytes", r.get("peak_rss_bytes"))


def verdicts(results: list[dict], device: str) -> dict:
    """Each target's measured value, limit and pass/fail (None where the mode did not run)."""
    by_mode = {r["mode"]: r for r in results if r.get("status") == "ok"}
    out = {}
    for name, limit in MEMORY_TARGETS_GIB.items():
        r = by_mode.get(name)
        if r is None:
            continue
        entry = {"limit_gib": limit}
        if device == "cuda":
            entry["allocated_gib"] = r["peak_allocated_bytes"] / GIB
            entry["reserved_gib"] = r["peak_reserved_bytes"] / GIB
            entry["pass_allocated"] = entry["allocated_gib"] <= limit
            entry["pass"] = entry["reserved_gib"] <= limit
        else:
            entry["rss_gib"] = r["peak_rss_bytes"] / GIB
            entry["pass"] = entry["rss_gib"] <= limit
        out[f"peak memory {name}"] = entry
    for name, r in by_mode.items():
        if r["offload"] != "blocks" or "plain_step_s" not in r:
            continue
        base = by_mode.get("none+fp8" if r["weights"] == "fp8" and "none+fp8" in by_mode else "none")
        if base is None or "plain_step_s" not in base:
            continue
        ratio = r["plain_step_s"] / base["plain_step_s"]
        out[f"{name} step / {base['mode']} step"] = {"ratio": ratio, "limit": BLOCKS_SLOWDOWN_TARGET,
                                                      "pass": ratio <= BLOCKS_SLOWDOWN_TARGET}  # fmt: skip
    return out


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def report(args, writer: dict, results: list[dict], checks: dict, skipped: list[str], on_target: bool) -> str:
    cuda = args.device == "cuda"
    lines = []
    files = writer.get("file_bytes", {})
    lines.append(f"checkpoint set: {sum(files.values()) / 1e9:.2f} GB in {len(files)} files, "
                 + ("reused" if writer.get("reused") else f"written in {writer['write_s']:.1f} s "
                    f"(transformer + AE {writer['transformer_ae_s']:.1f} s, text encoders {writer['text_encoders_s']:.1f} s; "
                    f"drawn on {writer['draw_device']})"))  # fmt: skip
    lines.append(f"{args.preset} {args.size}x{args.size}, {args.steps} steps, {args.device}, {args.dtype}"
                 f"{', compiled' if args.compile else ''}; edit: {EDIT_PROMPT!r} fine 5.0 (mask tau_m 0.5) + coarse 0.5\n")  # fmt: skip
    mem_head = "peak alloc GiB | peak reserved GiB" if cuda else "peak RSS GiB"
    lines.append(
        f"| mode | {mem_head} | load s | edit s | plain step s | edit step s | edit/plain | est {TARGET_STEPS}-step edit s |"
    )
    lines.append("|---|" + "---|" * (8 if cuda else 7))
    for r in results:
        if r.get("status") != "ok":
            cols = 8 if cuda else 7
            lines.append(f"| {r['mode']} | failed: {r.get('error', '?')} |" + " |" * (cols - 1))
            continue
        mem = (f"{r['peak_allocated_bytes'] / GIB:.2f} | {r['peak_reserved_bytes'] / GIB:.2f}" if cuda
               else f"{r['peak_rss_bytes'] / GIB:.2f}")  # fmt: skip
        lines.append(f"| {r['mode']} | {mem} | {r['load_s']:.1f} | {r['edit_s']:.2f} | {fmt(r.get('plain_step_s'), '.3f')} "
                     f"| {fmt(r.get('edit_step_s'), '.3f')} | {fmt(r.get('edit_over_plain'))} "
                     f"| {fmt(r.get(f'est_{TARGET_STEPS}_step_edit_s'), '.1f')} |")  # fmt: skip
    for note in skipped:
        lines.append(f"\n{note}")
    if checks:
        lines.append("\n| target | measured | limit | verdict |\n|---|---|---|---|")
        for name, c in checks.items():
            if "ratio" in c:
                lines.append(
                    f"| {name} | {c['ratio']:.2f}x | <= {c['limit']}x | {'PASS' if c['pass'] else 'FAIL'} |"
                )
            elif cuda:
                alloc = "PASS" if c["pass_allocated"] else "FAIL"
                lines.append(f"| {name} | reserved {c['reserved_gib']:.2f} GiB (alloc {c['allocated_gib']:.2f}) | <= {c['limit_gib']} GiB "
                             f"| {'PASS' if c['pass'] else 'FAIL'} (alloc {alloc}) |")  # fmt: skip
            else:
                lines.append(
                    f"| {name} | RSS {c['rss_gib']:.2f} GiB | <= {c['limit_gib']} GiB | {'PASS' if c['pass'] else 'FAIL'} |"
                )
        if not on_target:
            lines.append(
                "\n(the targets are for flux-dev at 1024 x 1024 on CUDA: on this run the verdicts are only indicative)"
            )
    return "\n".join(lines)


def default_out(args) -> Path:
    name = f"runtime_modes-{args.device}-{args.preset}-{args.size}px-{args.steps}steps"
    if args.depth is not None or args.depth_single is not None:
        name += f"-d{args.depth}s{args.depth_single}"
    if args.t5_layers != 24:
        name += f"-t5x{args.t5_layers}"
    return RESULTS / f"{name}{'-compiled' if args.compile else ''}.json"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_writer(args) if args.worker == "write" else run_mode(args)
        write_json(args.result, result)
        return result

    modes, skipped = [], []
    for text in args.modes.split(","):
        if not text.strip():
            continue
        mode = parse_mode(text)
        if mode.offload == "blocks" and args.device != "cuda":
            skipped.append(
                f"skipped {mode.name}: offload 'blocks' streams to a CUDA GPU (the library refuses it on {args.device})"
            )
            continue
        modes.append(mode)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flux-runtime-modes-", dir=args.tmp) as tmp:
        work = Path(tmp)
        folder = args.checkpoint_dir or work / "ckpt"
        writer = prepare_checkpoint(args, folder, work)
        results = run_modes(args, modes, folder, work)
    on_target = all(getattr(args, k) == v for k, v in TARGET_SHAPE.items()) and args.t5_layers == 24
    checks = verdicts(results, args.device)
    data = {
        "benchmark": "runtime_modes",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "mode", "folder", "result")
        },  # fmt: skip
        "prompt": PROMPT,
        "edit": {"concept": EDIT_PROMPT, "lambda_fine": 5.0, "tau_m": 0.5, "lambda_coarse": 0.5},
        "targets": {
            "memory_gib": MEMORY_TARGETS_GIB,
            "blocks_over_resident": BLOCKS_SLOWDOWN_TARGET,
            "shape": TARGET_SHAPE,
            "on_target_shape": on_target,
        },  # fmt: skip
        "checks": checks,
        "skipped": skipped,
        "writer": writer,
        "total_s": time.perf_counter() - t_start,
        "machine": machine_info(args.device),
        "results": results,
    }
    out = args.out or default_out(args)
    write_json(out, data)
    print()
    print(report(args, writer, results, checks, skipped, on_target))
    print(f"\ntotal {data['total_s']:.0f} s; wrote {out}")
    return data


if __name__ == "__main__":
    main()
