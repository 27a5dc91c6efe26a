"""flux-mini with its shipped LoRA (issue 17): what the LoRA adds, what it keeps, and FluxSpace edits on top.

    python benchmarks/mini_lora.py [--lora fluxspace/mini/weights/loras/pixel.safetensors] [--quick]

Every judgement is the attribute evaluator's (fluxspace.mini.evaluator); the style's score is
fluxspace.mini.loras.SCORES (pixel: 0 plain, 1 exact 2 px blocks). Seeds are fixed. Sections:

1. reference   held-out renders (seeds outside the training range): the style score and the
               evaluator's adherence on plain and styled renders, each as rendered and after an
               autoencoder round trip (the best a generation can show: it is decoded by that AE).
2. adds/keeps  --samples held-out prompts (mini_quality's adherence cases and seeds), generated with
               the LoRA at each --strengths: the style score (what the LoRA adds) and the evaluator's
               adherence to the prompts (what it keeps), per family and overall.
3. edits       mini_quality's EDITS (its settings, success and preservation, its targets), run with
               the LoRA off and on (strength 1), --edit-seeds base images each.

The LoRA is applied fused (flux_core.lora.fuse) and undone bit for bit after each use (`with_lora`).
Prints markdown tables and writes JSON to benchmarks/results/mini_lora-*.json (atomically).
"""

import argparse
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mini_quality as mq  # noqa: E402
from forward import RESULTS, machine_info, write_json  # noqa: E402

from flux_core.atomic import atomic_file  # noqa: E402
from flux_core.lora import file_sha256, fuse, linear_shapes, read_lora, updates_for  # noqa: E402
from fluxspace import SampleSettings, edit_image, load_models  # noqa: E402
from fluxspace.mini.attributes import FAMILIES, sample_attributes  # noqa: E402
from fluxspace.mini.captions import prompt_for  # noqa: E402
from fluxspace.mini.evaluator import load_evaluator  # noqa: E402
from fluxspace.mini.loras import SCORES, STYLES, shipped_lora  # noqa: E402
from fluxspace.mini.render import render_batch, to_tensor  # noqa: E402


@contextmanager
def with_lora(models, path: Path, strength: float):
    """models.flow with the LoRA at `path` fused in at `strength` inside the block (strength 0: untouched)."""
    fused = fuse(models.flow, updates_for(read_lora(path), "flow", linear_shapes(models.flow)), strength)
    try:
        yield models
    finally:
        fused.undo()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=mq.DEFAULT_MODEL, help="flux-mini folder (default: the shipped one)")
    p.add_argument("--lora", type=Path, default=None, help="LoRA file (default: the shipped pixel LoRA)")
    p.add_argument("--style", default="pixel", help=f"the style the LoRA was trained on: {', '.join(SCORES)}")
    p.add_argument("--strengths", default="0,0.5,1", help="comma-separated LoRA strengths of section 2")
    p.add_argument("--samples", type=int, default=64, help="held-out prompts per strength")
    p.add_argument("--reference-samples", type=int, default=128, help="held-out renders of section 1")
    p.add_argument("--edit-seeds", type=int, default=16, help="base images per edit, LoRA off and on")
    p.add_argument("--edits", default=",".join(mq.EDITS), help=f"comma-separated subset of {', '.join(mq.EDITS)}")
    p.add_argument("--sections", default="reference,strengths,edits", help="comma-separated sections to run")
    p.add_argument("--batch", type=int, default=16, help="images per generate call")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, attributes and noise seeds")
    p.add_argument("--quick", action="store_true", help="tiny counts everywhere: a smoke test")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    p.add_argument("--sheet", type=Path, default=None, help="also write a PNG: rows of base, LoRA 0.5, LoRA 1, "
                   "LoRA 1 + sunglasses, LoRA 1 + hat (then only the sheet is made unless --all)")
    p.add_argument("--all", action="store_true", help="with --sheet: run the measurements too")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.reference_samples, args.edit_seeds, args.edits = 2, 4, 1, "smile"
    if args.style not in SCORES:
        p.error(f"unknown style {args.style!r}; valid: {', '.join(SCORES)}")
    bad = [e for e in args.edits.split(",") if e not in mq.EDITS]
    if bad:
        p.error(f"unknown edit(s) {', '.join(bad)}; valid: {', '.join(mq.EDITS)}")
    args.strengths = [float(s) for s in args.strengths.split(",")]
    args.lora = args.lora or shipped_lora(args.style)
    return args


def as_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    return to_tensor(np.stack([np.asarray(im) for im in images]))


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


# ----------------------------------------------------------------------------------------------
# 1. Reference: renders plain and styled, as drawn and through the autoencoder


@torch.no_grad()
def run_reference(models, evaluator, args) -> dict:
    rng = np.random.default_rng(args.seed + 1)  # mini_quality's AE renders: held out, unseen seeds
    attrs = [sample_attributes(rng, split="held_out") for _ in range(args.reference_samples)]
    seeds = [mq.UNSEEN_SEED + args.seed * 100_000 + i for i in range(len(attrs))]
    plain = to_tensor(render_batch(attrs, seeds, args.size))  # (B, 3, H, W)
    stated = [a.as_dict() for a in attrs]  # every family is known on a render
    out = {}
    for name, x in (("render", plain), ("styled render", STYLES[args.style](plain))):
        rec = torch.cat([models.ae.decode(models.ae.encode(x[i : i + args.batch].to(models.device, models.dtype)))
                         .float().clamp(-1, 1).cpu() for i in range(0, len(x), args.batch)])  # fmt: skip
        for suffix, images in (("", x), (" + AE", rec)):
            result = mq.score_adherence(evaluator, images, stated)
            out[name + suffix] = {"style_score": mean(SCORES[args.style](images)), "adherence": result}
    return {"samples": len(attrs), "images": out}


# ----------------------------------------------------------------------------------------------
# 2. What the LoRA adds and keeps


def run_strengths(models, evaluator, args, settings) -> dict:
    cases = mq.adherence_cases(args.samples, args.seed)
    seeds = [args.seed * 100_000 + i for i in range(len(cases))]
    prompts = [prompt_for(c) for c in cases]
    out = {}
    for strength in args.strengths:
        with with_lora(models, args.lora, strength):
            images = mq.generate_all(models, prompts, seeds, settings, args.batch)
        scores = SCORES[args.style](as_tensor(images))
        out[str(strength)] = {"style_score": mean(scores), "style_score_min": float(scores.min()),
                              "adherence": mq.score_adherence(evaluator, images, cases)}  # fmt: skip
    return {"samples": len(cases), "strengths": out}


# ----------------------------------------------------------------------------------------------
# 3. FluxSpace edits with the LoRA off and on


def run_edits(models, evaluator, args, settings, out: dict, done=lambda: None) -> dict:
    """Fills `out` {edit: {"off": result, "on": result}}, calling done() after each edit."""
    for name in args.edits.split(","):
        result = {}
        for label, strength in (("off", 0.0), ("on", 1.0)):
            with with_lora(models, args.lora, strength):
                result[label] = mq.run_edit(models, evaluator, args, settings, name)
            print(f"edit {name}, LoRA {label}: success {mq.pct(result[label]['success'])}, "
                  f"preservation {mq.pct(result[label]['preservation'])}", file=sys.stderr, flush=True)  # fmt: skip
        out[name] = result
        done()
    return out


# ----------------------------------------------------------------------------------------------
# Figure


SHEET_PROMPTS = tuple(prompt_for(stated) for stated in (
    {"hair": "red", "mouth": "smile", "background": "blue"},
    {"skin": "dark", "hair": "blond", "mouth": "frown", "background": "green"},
    {"hair": "black", "beard": "beard", "background": "pink"},
    {"hair": "brown", "style": "sketch", "background": "grey"},
))  # fmt: skip


def sheet(models, args, settings, scale: int = 2):
    """Rows per SHEET_PROMPTS: base, LoRA 0.5, LoRA 1, LoRA 1 + sunglasses edit, LoRA 1 + hat edit;
    every tile enlarged `scale` x with nearest neighbours (so the 2 px blocks stay blocks)."""
    rows = []
    for i, prompt in enumerate(SHEET_PROMPTS):
        row = []
        for strength in (0.0, 0.5, 1.0):
            with with_lora(models, args.lora, strength):
                row += mq.generate_all(models, [prompt], [i], settings, 1)
        with with_lora(models, args.lora, 1.0):
            for name in ("sunglasses", "hat"):
                row.append(edit_image(models, prompt, mq.EDITS[name].spec(), seed=i, settings=settings,
                                      progress=False).edited)  # fmt: skip
        rows.append(row)
    size, gap = rows[0][0].width * scale, 2
    out = Image.new("RGB", (5 * (size + gap) - gap, len(rows) * (size + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            out.paste(tile.resize((size, size), Image.NEAREST), (c * (size + gap), r * (size + gap)))
    return out


# ----------------------------------------------------------------------------------------------
# Report


def tables(data: dict) -> str:
    if "reference" not in data or "strengths" not in data:
        return edit_table(data["edits"])
    ref, st, edits = data["reference"], data["strengths"], data["edits"]
    style = data["settings"]["style"]
    lines = [f"## Reference: {ref['samples']} held-out renders", "",
             f"| images | {style} score | adherence (all 9 families) |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {r['style_score']:.3f} | {mq.pct(r['adherence']['overall'])} |"
              for name, r in ref["images"].items()]  # fmt: skip
    lines += ["", f"## The LoRA at each strength: {st['samples']} held-out prompts", "",
              f"| strength | {style} score (mean) | adherence overall | " + " | ".join(FAMILIES) + " |",
              "|---" * (3 + len(FAMILIES)) + "|"]  # fmt: skip
    for s, r in st["strengths"].items():
        fam = " | ".join(mq.pct(r["adherence"]["per_family"][f]["rate"]) for f in FAMILIES)
        lines.append(f"| {s} | {r['style_score']:.3f} | {mq.pct(r['adherence']['overall'])} | {fam} |")
    return "\n".join(lines) + "\n\n" + edit_table(edits)


def edit_table(edits: dict) -> str:
    lines = ["## FluxSpace edits (mini_quality.EDITS), LoRA off / on", "",
              "| edit | seeds off / on | success off | success on | preservation off | preservation on | "
              "targets off | targets on | most changed (on) |", "|---" * 9 + "|"]  # fmt: skip
    for name, e in edits.items():
        off, on = e["off"], e["on"]

        def verdict(r):
            t = r["targets"]
            return "PASS" if t["success"]["pass"] and t["preservation"]["pass"] else "FAIL"

        lines.append(f"| {name} | {off['seeds']} / {on['seeds']} | {mq.pct(off['success'])} | {mq.pct(on['success'])} | "
                     f"{mq.pct(off['preservation'])} | {mq.pct(on['preservation'])} | {verdict(off)} | {verdict(on)} | "
                     f"{mq.most_changed(on['changed'])} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    mq.check_model(args.model)
    models = load_models(args.model)
    evaluator = load_evaluator()
    args.size = models.preset.default_size
    settings = SampleSettings(width=args.size, height=args.size)
    lora = read_lora(args.lora)
    print(f"{models.preset.name} + {args.lora} ({lora.format}, rank {lora.ranks()}), {args.size}px", file=sys.stderr)
    if args.sheet:
        with atomic_file(args.sheet) as f:
            sheet(models, args, settings).save(f, format="PNG")
        print(f"wrote {args.sheet}", file=sys.stderr)
        if not args.all:
            return {}
    data = {
        "benchmark": "mini_lora",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"preset": models.preset.name, "resolved": vars(settings.resolved(models.preset))},
        "lora": {"path": str(args.lora), "sha256": file_sha256(args.lora), "metadata": lora.metadata},
        "machine": machine_info("cpu" if models.device.type == "cpu" else "cuda"),
        "targets": mq.TARGETS,
    }
    out = args.out or RESULTS / f"mini_lora-{args.lora.stem}{'-quick' if args.quick else ''}.json"
    # Written after every section ("complete" false until the last): a long run stopped early keeps its work.
    data["complete"] = False
    sections = args.sections.split(",")
    if "reference" in sections:
        data["reference"] = run_reference(models, evaluator, args)
        write_json(out, data)
    if "strengths" in sections:
        data["strengths"] = run_strengths(models, evaluator, args, settings)
        write_json(out, data)
    data["edits"] = {}
    if "edits" in sections:
        run_edits(models, evaluator, args, settings, data["edits"], lambda: write_json(out, data))
    data["complete"] = True
    write_json(out, data)
    print(tables(data))
    print(f"\nwrote {out}")
    return data


if __name__ == "__main__":
    main()
