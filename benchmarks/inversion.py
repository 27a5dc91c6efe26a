"""Inversion on flux-mini (issue 6): reconstruction of held-out renders, and edits of real (rendered) images.

    python benchmarks/inversion.py [--images 32] [--steps 8,16,30] [--edit-images 32]

1. Reconstruction: --images renders of held-out attribute combinations with render seeds never used
   in training, each inverted and reconstructed by every METHOD at every step count; PSNR and SSIM
   against the render (64 px), and the transformer evaluations of one inversion + reconstruction.
   Every pass conditions on the render's full caption (prompt_for of its attributes), true CFG off.
2. Edits of real images: for each local edit of mini_quality, --edit-images renders without the
   attribute, inverted with the best method and edited with FluxSpace in the reverse pass (the
   settings of mini_quality.EDITS); success and preservation read by the evaluator, edited vs the
   reconstruction.

Prints markdown tables; writes benchmarks/results/inversion.json.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mini_quality  # noqa: E402
from forward import RESULTS, write_json  # noqa: E402

from fluxspace import SampleSettings, load_models  # noqa: E402
from fluxspace.inversion import InversionSettings, invert_image  # noqa: E402
from fluxspace.mini.attributes import sample_attributes  # noqa: E402
from fluxspace.mini.captions import prompt_for  # noqa: E402
from fluxspace.mini.evaluator import load_evaluator  # noqa: E402
from fluxspace.mini.render import render  # noqa: E402

UNSEEN_SEED = 2**31 + 500_000  # render seeds above every training seed
METHODS = {
    "euler": InversionSettings(),
    "midpoint": InversionSettings(solver="midpoint"),
    "fireflow": InversionSettings(solver="midpoint", reuse=True),
    "rf-inversion": InversionSettings(gamma=0.5, eta=0.9, eta_stop=0.25),
}


def ssim(a, b) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over RGB channels."""
    x, y = (torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)[:, None]
            for im in (a, b))  # fmt: skip  (3, 1, H, W)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None]) / g.sum() ** 2  # (11, 11)
    w = w[None, None]

    def blur(z):
        return F.conv2d(z, w)  # valid window positions only

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def caption(attrs) -> str:
    """The render's full caption: every present attribute (absences cannot be stated)."""
    return prompt_for({f: v for f, v in attrs.as_dict().items() if v != "none"})


def renders(n: int, seed: int):
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng, "held_out") for _ in range(n)]
    return [(a, render(a, UNSEEN_SEED + seed * 10_000 + i, size=64)) for i, a in enumerate(attrs)]


def run_reconstruction(models, images, step_counts: list[int]) -> dict:
    table = {}
    for name, settings in METHODS.items():
        for steps in step_counts:
            psnrs, ssims, evals = [], [], 0
            t0 = time.perf_counter()
            for attrs, image in images:
                r = invert_image(models, image, caption(attrs), settings=SampleSettings(steps=steps), inversion=settings)
                psnrs.append(r.psnr)
                ssims.append(ssim(r.image, r.reconstruction))
                evals = r.evaluations
            table[f"{name}@{steps}"] = {"method": name, "steps": steps, "psnr_db": statistics.mean(psnrs),
                                        "ssim": statistics.mean(ssims), "evaluations": evals,
                                        "seconds_per_image": (time.perf_counter() - t0) / len(images)}  # fmt: skip
            print(f"{name} {steps} steps: {table[f'{name}@{steps}']['psnr_db']:.2f} dB", file=sys.stderr, flush=True)
    return table


def run_edits(models, evaluator, n: int, method: str, steps: int) -> dict:
    out = {}
    for k, (name, edit) in enumerate(mini_quality.EDITS.items()):
        rng = np.random.default_rng(100 + k)
        cases = []
        while len(cases) < n:
            attrs = sample_attributes(rng, "held_out")
            if getattr(attrs, edit.family) != edit.value:
                cases.append(attrs)
        successes, kept = [], []
        for i, attrs in enumerate(cases):
            image = render(attrs, UNSEEN_SEED + 900_000 + 1000 * k + i, size=64)
            r = invert_image(models, image, caption(attrs), settings=SampleSettings(steps=steps), inversion=METHODS[method],
                             edit_spec=edit.spec())  # fmt: skip
            before, after = evaluator.score([r.reconstruction, r.edited]).predicted
            ok, share = mini_quality.edit_outcome(edit, before, after)
            successes.append(ok)
            kept.append(share)
        out[name] = {"images": n, "success": sum(successes) / n, "preservation": sum(kept) / n,
                     "lambda_fine": edit.lambda_fine, "tau_m": edit.tau_m, "start": edit.start}  # fmt: skip
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32, help="held-out renders reconstructed per method and steps")
    p.add_argument("--steps", default="8,16,30", help="step counts")
    p.add_argument("--edit-images", type=int, default=32, help="renders edited per local edit")
    p.add_argument("--edit-steps", type=int, default=30)
    args = p.parse_args(argv)
    step_counts = [int(s) for s in args.steps.split(",")]
    models, evaluator = load_models(), load_evaluator().eval()
    t0 = time.perf_counter()
    rec = run_reconstruction(models, renders(args.images, 0), step_counts)
    best = max((r for r in rec.values() if r["steps"] == max(step_counts)), key=lambda r: r["psnr_db"])["method"]
    edits = run_edits(models, evaluator, args.edit_images, best, args.edit_steps) if args.edit_images else {}
    data = {"benchmark": "inversion", "images": args.images, "reconstruction": rec, "best_method": best,
            "edits": edits, "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}  # fmt: skip
    write_json(RESULTS / "inversion.json", data)
    print("| method | steps | PSNR dB | SSIM | transformer evaluations | s / image |\n|---|---|---|---|---|---|")
    for r in rec.values():
        print(f"| {r['method']} | {r['steps']} | {r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['evaluations']} | "
              f"{r['seconds_per_image']:.2f} |")  # fmt: skip
    if edits:
        print(f"\nEdits of real renders ({best}, {args.edit_steps} steps)\n\n| edit | success | preservation |\n|---|---|---|")
        for name, e in edits.items():
            print(f"| {name} | {100 * e['success']:.1f}% | {100 * e['preservation']:.1f}% |")
    return data


if __name__ == "__main__":
    main()
