"""Build flux-mini from nothing: one command from procedural renders to a model folder.

    python -m fluxspace.mini.build --out flux-mini [--device cuda] [--steps-ae N] [--steps-flow N] [--resume]

Stages (each result cached under --work, default OUT-work, so --resume picks up where a run stopped):

    1. render the training faces (data.py) and draw their captions         work/faces.npz
    2. write the text encoders: tokenizers trained on the caption corpus, T5 and CLIP models random
       and frozen (see below); OUT/text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/
    3. train the autoencoder (train_ae.py)                                work/ae/{checkpoint.safetensors,log.jsonl}
    4. measure its latents (shift = mean, scale = 1/std) and held-out PSNR; write OUT/ae.safetensors
    5. encode the faces to latents and their captions to features, once   work/encoded.safetensors
    6. train the flow transformer (train_flow.py)                         work/flow/{checkpoint.safetensors,log.jsonl}
       then its warm restarts (--flow-restarts), each from the last weights  work/flow-extra, flow-extra-2
    7. write OUT/flux-mini.safetensors: the EMA weights in bf16, official key layout, with metadata

OUT then holds exactly what an official release holds, and loads the same way:
`fluxspace.load_models(OUT)` or `flux_core.load_flow_model(OUT / "flux-mini.safetensors")`.

Why random, frozen text encoders: the official encoders are frozen too (the flow model adapts to
them, not the reverse), and on a domain of ~55 words a random T5 already gives every word its own
direction; training one would need a text objective this project has no use for. The tokenizers
are trained on the captions (see tokenizer_corpus), so nearly every caption word is one token.

--time-limit stops a stage at a step boundary (checkpointing) once the budget is spent and exits
with status 3; rerun with --resume to go on. That splits a build over several GPU sessions.

Cost on 2 CPU cores (torch 2.13.0, 2 threads): the flow stages dominate, 13,000 steps at batch 64
in all (4,000 + the two restarts' 6,000 and 3,000) at 1-1.7 s a step: about 4.5 h for the whole
build on the machine that built the shipped model, about 6 h on a slower one. docs/flux_mini.md
has the measured time of every stage. On a GPU pass --device cuda (and --bf16); the step counts stay the
same. A few steps of each (the tests) prove the pipeline in seconds.
"""

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch

from flux_core.atomic import atomic_file
from flux_core.conditioner import TEXT_ENCODER_FOLDERS, TextEncoders, load_text_encoders
from flux_core.inference import ae_metadata, flux_metadata
from flux_core.model import Flux
from flux_core.presets import get_preset
from weights_tools.text_encoders import install_text_encoders

from .captions import caption_corpus
from .data import cached_faces, caption_sets, make_faces
from .train import TrainConfig
from .train_ae import latent_normalisation, psnr, train_autoencoder, with_normalisation
from .train_flow import CaptionBank, encode_captions, train_flow

PRESET = "flux-mini"
TRANSFORMER_FILE = "flux-mini.safetensors"
AE_FILE = "ae.safetensors"
TEXT_LAYERS, TEXT_HEADS = 2, 2  # small T5 / CLIP: depth and heads (their widths come from the preset)
INCOMPLETE = 3  # exit status when --time-limit stopped the build before the end


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    work: Path
    device: str = "cpu"
    steps_ae: int = 3_000
    steps_flow: int = 4_000
    batch_ae: int = 16
    batch_flow: int = 64
    lr_ae: float = 8e-4
    lr_flow: float = 8e-4
    # Warm restarts of the flow stage: each goes on from the previous stage's weights with a fresh
    # warmup + cosine (steps, peak lr), so more training never redoes what is done. The shipped
    # flux-mini has two: after 4,000 steps it was weak on the eyewear and mouth words; 6,000 more
    # fixed the mouths, and the last 3,000 at a lower rate are for the eyeglasses (thin frames).
    flow_restarts: tuple[tuple[int, float], ...] = ((6_000, 4e-4), (3_000, 2e-4))
    images: int = 20_000  # training renders (train split only), each with `captions_per_image` captions
    captions_per_image: int = 4
    eval_images: int = 256  # held-out renders for the PSNR
    stats_images: int = 2048  # renders the latent shift and scale are measured on
    corpus_size: int = 20_000  # captions the tokenizers are trained on
    seed: int = 0
    bf16: bool = False  # bf16 autocast on CUDA
    workers: int = 1  # processes rendering the faces
    resume: bool = False
    time_limit: float | None = None  # seconds for the whole build
    progress: bool = True


def restart_folder(k: int) -> str:
    """Work folder of the k-th warm restart (from 1); the first keeps its original name."""
    return "flow-extra" if k == 1 else f"flow-extra-{k}"


def parse_restarts(text: str) -> tuple[tuple[int, float], ...]:
    """"6000:4e-4,3000:2e-4" -> ((6000, 4e-4), (3000, 2e-4)); "" or "none" -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    stages = []
    for item in text.split(","):
        try:
            steps, lr = item.split(":")
            stages.append((int(steps), float(lr)))
        except ValueError:
            raise ValueError(f"bad flow restart {item!r}: expected STEPS:LR, e.g. 6000:4e-4 (or 'none')") from None
        if stages[-1][0] <= 0 or stages[-1][1] <= 0:
            raise ValueError(f"bad flow restart {item!r}: steps and lr must be positive")
    return tuple(stages)


def _warmup(steps: int) -> int:
    return min(1000, steps // 20)  # 5% of a run, at most 1000 steps


def _write_safetensors(module: torch.nn.Module, path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    from weights_tools.convert import write_safetensors  # the project's atomic safetensors writer

    state = {k: v.detach().to("cpu", dtype) for k, v in module.state_dict().items()}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    return write_safetensors(path, plan, state.items(), metadata={"format": "pt", **metadata}, force=True)


def save_encoded(path: Path, latents: torch.Tensor, bank: CaptionBank) -> None:
    """The latents and the caption bank in one safetensors file (the captions as JSON metadata), atomically."""
    tensors = {"latents": latents, "txt": bank.txt, "vec": bank.vec, "ids": bank.ids}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_file(path) as f:
        f.write(safetensors.torch.save(tensors, metadata={"captions": json.dumps(bank.captions)}))


def load_encoded(path: Path) -> tuple[torch.Tensor, CaptionBank]:
    with safetensors.safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        captions = tuple(json.loads(f.metadata()["captions"]))
    return t["latents"], CaptionBank(t["txt"], t["vec"], t["ids"], captions)


def tokenizer_corpus(n: int, seed: int) -> list[str]:
    """n captions, then every word they use once on a line of its own.

    On a corpus of only ~55 distinct words, sentencepiece's unigram trainer keeps sub-word pieces
    for the most frequent words ("with" -> "▁", "wi", "th"; the longest caption then needs 65 T5
    tokens). A line per word gives each its own seed piece: words become one token (longest: 43).
    """
    corpus = caption_corpus(n, seed)
    return corpus + sorted({word for text in corpus for word in re.findall(r"[\w-]+", text)})


def folder_size(out: Path) -> int:
    """Bytes of the released files (transformer, AE, text-encoder folders)."""
    files = [out / TRANSFORMER_FILE, out / AE_FILE] + [f for d in TEXT_ENCODER_FOLDERS for f in (out / d).rglob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def check_caption_lengths(text: TextEncoders, captions: list[list[str]]) -> int:
    """The longest caption in T5 tokens; raise if any would be cut off at the preset's t5_max_length."""
    unique = sorted({c for caption_list in captions for c in caption_list})
    lengths = [len(ids) for ids in text.t5_tokenizer(unique)["input_ids"]]  # with </s>, no padding
    longest = max(range(len(unique)), key=lengths.__getitem__)
    if lengths[longest] > text.t5_max_length:
        raise ValueError(
            f"caption {unique[longest]!r} is {lengths[longest]} T5 tokens, more than the {text.t5_max_length} "
            f"of preset {PRESET!r}: its end would be cut off in training; raise t5_max_length or shorten the templates"
        )
    return lengths[longest]


def build(config: BuildConfig) -> dict:
    """Run every stage; returns a report (also written to work/build.json). report["complete"] is
    False when the time limit stopped a training stage: run again with resume=True."""
    preset = get_preset(PRESET)
    out, work, device = Path(config.out), Path(config.work), torch.device(config.device)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict = {"config": {k: str(v) for k, v in asdict(config).items()}, "complete": False, "seconds": {}}
    if config.resume and (work / "build.json").is_file():
        # Keep the stage seconds of the runs this one goes on from: the build's wall time is their sum.
        before = json.loads((work / "build.json").read_text())
        report["earlier_runs"] = [*before.get("earlier_runs", []), before["seconds"]]

    def remaining() -> float | None:
        return None if config.time_limit is None else max(0.0, config.time_limit - (time.monotonic() - started))

    def stage_done(name: str, t0: float) -> None:
        report["seconds"][name] = round(time.monotonic() - t0, 1)
        with atomic_file(work / "build.json", "w") as f:  # a killed run leaves the last whole report
            f.write(json.dumps(report, indent=2))

    # 1. data: renders and their captions
    t0 = time.monotonic()
    size = preset.ae_params.resolution
    faces = cached_faces(work / "faces.npz", config.images, config.seed, size, "train", config.workers)
    captions = caption_sets(faces.attrs, config.captions_per_image, config.seed)
    stage_done("render", t0)

    # 2. text encoders (first, as they need no training: a caption too long for them fails at once)
    t0 = time.monotonic()
    if not (config.resume and all((out / d).is_dir() for d in TEXT_ENCODER_FOLDERS)):
        p = preset.params
        corpus = tokenizer_corpus(config.corpus_size, config.seed)
        install_text_encoders(
            out, overwrite=True, t5_dim=p.context_in_dim, clip_dim=p.vec_in_dim, t5_max_length=preset.t5_max_length,
            seed=config.seed, corpus=corpus, num_layers=TEXT_LAYERS, num_heads=TEXT_HEADS,
        )  # fmt: skip
    text = load_text_encoders(out, t5_max_length=preset.t5_max_length, device=device)
    report["longest_caption_tokens"] = check_caption_lengths(text, captions)
    stage_done("text_encoders", t0)

    # 3. autoencoder
    t0 = time.monotonic()
    ae_config = TrainConfig(
        steps=config.steps_ae, batch_size=config.batch_ae, lr=config.lr_ae, warmup_steps=_warmup(config.steps_ae),
        seed=config.seed, bf16=config.bf16,
    )  # fmt: skip
    run = train_autoencoder(
        faces, preset.ae_params, ae_config, work / "ae", device, resume=config.resume,
        time_limit=remaining(), progress=config.progress,
    )  # fmt: skip
    report["ae_steps"] = run.step
    stage_done("autoencoder", t0)
    if not run.finished:
        return report

    # 4. latent normalisation, held-out PSNR, ae.safetensors (EMA weights, float32 as FLUX.1's)
    t0 = time.monotonic()
    scale, shift = latent_normalisation(run.ema, faces.first(config.stats_images), device=device)
    ae = with_normalisation(run.ema, scale, shift)
    held_out = make_faces(config.eval_images, config.seed + 1, size, "held_out", config.workers)
    report |= {"scale_factor": scale, "shift_factor": shift, "psnr_held_out": psnr(ae, held_out, device=device)}
    _write_safetensors(ae, out / AE_FILE, torch.float32, ae_metadata(ae.params))
    stage_done("ae_file", t0)

    # 5. latents and caption features, encoded once
    t0 = time.monotonic()
    encoded_path = work / "encoded.safetensors"  # (latents.pt and captions.pt before: pickles, not read)
    cached = config.resume and encoded_path.is_file()
    if cached:
        latents, bank = load_encoded(encoded_path)
        cached = latents.shape[0] == len(faces) and tuple(bank.ids.shape) == (len(faces), config.captions_per_image)
    if not cached:
        with torch.no_grad():
            latents = torch.cat(
                [ae.encode(faces.tensor(slice(i, i + 64)).to(device)).cpu() for i in range(0, len(faces), 64)]
            )  # (N, Z, h, w), normalised: what the flow model learns to produce
        bank = encode_captions(text, captions)
        save_encoded(encoded_path, latents, bank)
    report["unique_captions"] = len(bank.captions)
    del text
    stage_done("encode", t0)

    # 6. flow transformer
    t0 = time.monotonic()
    flow_config = TrainConfig(
        steps=config.steps_flow, batch_size=config.batch_flow, lr=config.lr_flow,
        warmup_steps=_warmup(config.steps_flow), seed=config.seed, bf16=config.bf16,
    )  # fmt: skip
    run = train_flow(
        latents, bank, preset.params, flow_config, work / "flow", device, resume=config.resume,
        time_limit=remaining(), progress=config.progress,
    )  # fmt: skip
    report |= {"flow_steps": run.step, "flow_loss": run.loss}
    stage_done("flow", t0)
    if not run.finished:
        return report

    # 6b. warm restarts, each from the previous stage's weights (folders flow-extra, flow-extra-2, ...)
    for k, (steps, lr) in enumerate(config.flow_restarts, start=1):
        t0 = time.monotonic()
        restart_config = TrainConfig(
            steps=steps, batch_size=config.batch_flow, lr=lr, warmup_steps=_warmup(steps), seed=config.seed + k,
            bf16=config.bf16,
        )  # fmt: skip
        previous = {"model": run.model.state_dict(), "ema": run.ema.state_dict()}
        run = train_flow(
            latents, bank, preset.params, restart_config, work / restart_folder(k), device, resume=config.resume,
            time_limit=remaining(), progress=config.progress, init=previous,
        )  # fmt: skip
        report["flow_restart_steps"] = [*report.get("flow_restart_steps", []), run.step]
        report["flow_loss"] = run.loss
        stage_done(f"flow_restart_{k}", t0)
        if not run.finished:
            return report

    # 7. the transformer file: EMA weights in bf16, like the official release
    flow: Flux = run.ema
    _write_safetensors(flow, out / TRANSFORMER_FILE, torch.bfloat16, flux_metadata(flow.params, PRESET))
    report["parameters"] = {
        "transformer": sum(p.numel() for p in flow.parameters()),
        "autoencoder": sum(p.numel() for p in ae.parameters()),
    }
    report["bytes"] = folder_size(out)
    report["complete"] = True
    stage_done("total", started)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxspace.mini.build", description=__doc__.split("\n\n")[0])
    d = BuildConfig(out=Path("."), work=Path("."))
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--work", type=Path, help="caches and checkpoints (default: OUT-work, beside OUT)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--steps-ae", type=int, default=d.steps_ae, help="autoencoder training steps")
    parser.add_argument("--steps-flow", type=int, default=d.steps_flow, help="flow transformer training steps")
    parser.add_argument("--lr-ae", type=float, default=d.lr_ae, help="autoencoder peak learning rate")
    parser.add_argument("--lr-flow", type=float, default=d.lr_flow, help="flow transformer peak learning rate")
    parser.add_argument("--flow-restarts", default=",".join(f"{n}:{lr:g}" for n, lr in d.flow_restarts),
                        help="warm restarts of the flow stage, STEPS:LR,... each from the previous weights "
                        "(default %(default)s; 'none': no restart)")  # fmt: skip
    parser.add_argument("--batch-ae", type=int, default=d.batch_ae, help="images per autoencoder step")
    parser.add_argument("--batch-flow", type=int, default=d.batch_flow, help="latents per flow step")
    parser.add_argument("--images", type=int, default=d.images, help="training renders")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workers", type=int, default=d.workers, help="processes for rendering")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints and caches in --work")
    parser.add_argument("--time-limit", type=float, help="seconds; stop cleanly (exit status 3), then --resume")
    args = parser.parse_args(argv)
    try:
        restarts = parse_restarts(args.flow_restarts)
    except ValueError as e:
        parser.error(str(e))
    work = args.work or args.out.with_name(args.out.name + "-work")
    config = BuildConfig(
        out=args.out, work=work, device=args.device, steps_ae=args.steps_ae, steps_flow=args.steps_flow,
        batch_ae=args.batch_ae, batch_flow=args.batch_flow, lr_ae=args.lr_ae, lr_flow=args.lr_flow,
        flow_restarts=restarts, images=args.images, seed=args.seed,
        workers=args.workers, bf16=args.bf16, resume=args.resume, time_limit=args.time_limit,
    )  # fmt: skip
    report = build(config)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    if not report["complete"]:
        print(f"stopped by --time-limit; run again with --resume to continue (work folder {work})", file=sys.stderr)
        return INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
