"""Does FluxSpace give Kontext a usable strength control? flux-mini-kontext on held-out faces (issue 19).

    python benchmarks/mini_kontext.py [--faces 16] [--work DIR] [--out benchmarks/results] [--quick]

Every case is a held-out face (attributes' held_out split) rendered with a seed never used in
training: the image to edit. The attribute evaluator reads the image to edit and each output, so
every method is judged against the same input:

- success: the target value is read in the output (for a removal: the attribute is gone). Faces
  where the evaluator already reads the target (for a removal: does not read the attribute) are
  skipped before any sampling;
- preservation: the share of the other families read unchanged, output vs input;
- PSNR outside the region the edit may touch (fluxspace.mini.regions), output vs input.
Cells are means with a 95% bootstrap interval over the faces (edit_quality.summarise).

Methods (MODES), each along the strength lambda of FluxSpace's fine edit:
  (a) kontext        flux-mini-kontext with the trained instruction ("add a hat"); one point, no
                     strength. (a') the same with a phrasing never seen in training (HELD_OUT).
  (b) kontext+fs     the instruction as the base prompt; FluxSpace fine along the instruction's
                     keyword on the generated tokens, lambda in LAMBDAS["b"] (negative: against it),
                     with the keyword mask; (b0) the same without the mask.
  (b') empty+fs      the empty instruction as the base and the instruction as FluxSpace's concept
                     (no mask). The empty instruction is the unconditional branch of training
                     (caption dropout), so lambda 0 is "some edit", not the input.
  (c) inversion+fs   today's real-image path on the text-to-image flux-mini: the image inverted with
                     its caption, FluxSpace fine along the keyword in the reverse pass.
Edits Kontext was not trained on: "hat + eyeglasses" (two concepts: one instruction saying both;
the hat instruction + FluxSpace eyeglasses; two FluxSpace concepts on inversion). The removal
("remove beard") is trained as an instruction; FluxSpace removes with a negative lambda.

Rows are written to --work as they are made (JSONL), so a killed run resumes where it stopped.
Prints markdown tables; writes benchmarks/results/mini_kontext.json, .md and the trade-off plot.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_quality import Task, fmt, score_pair, summarise, write_text  # noqa: E402
from forward import RESULTS, machine_info, write_json  # noqa: E402
from inversion import METHODS as INVERSIONS  # noqa: E402
from inversion import caption  # noqa: E402

from flux_core.atomic import atomic_file  # noqa: E402
from fluxspace import FluxSpaceSchedule, SampleSettings, SamplingRun, load_models  # noqa: E402
from fluxspace.images import psnr  # noqa: E402
from fluxspace.inversion import invert_image  # noqa: E402
from fluxspace.mini.attributes import FAMILIES, sample_attributes  # noqa: E402
from fluxspace.mini.evaluator import load_evaluator  # noqa: E402
from fluxspace.mini.regions import region  # noqa: E402
from fluxspace.mini.render import render  # noqa: E402
from fluxspace.spec import Concept, EditSpec, encode_edit  # noqa: E402

UNSEEN_SEED = 2**31 + 700_000  # render seeds above every training seed, apart from inversion.py's
START = 0.9  # every FluxSpace edit switches on at t = 0.9 (t = 1 noise): the layout is fixed by then
TAU_M = 0.5
INVERSION, INVERSION_STEPS = "midpoint", 8  # benchmarks/inversion.py's best reconstruction per evaluation


@dataclass(frozen=True)
class KontextTask:
    task: Task  # family, target value, keyword, sign (edit_quality.Task)
    instruction: str  # a trained phrasing (edit_pairs.INSTRUCTIONS)
    held_out: str  # a phrasing never seen in training
    concept: str  # FluxSpace's concept prompt on Kontext: the instruction that adds the attribute

    @property
    def name(self) -> str:
        return self.task.name


TASKS = (
    KontextTask(Task("eyeglasses", "eyewear", "eyeglasses", "eyeglasses"), "add eyeglasses",
                "the person wears eyeglasses", "add eyeglasses"),
    KontextTask(Task("hat", "hat", "hat", "hat"), "add a hat", "the person wears a hat", "add a hat"),
    KontextTask(Task("smile", "mouth", "smile", "smile"), "make the person smile", "a smiling person",
                "make the person smile"),
    KontextTask(Task("beard", "beard", "beard", "beard"), "add a beard", "the person has a beard", "add a beard"),
    KontextTask(Task("remove beard", "beard", "none", "beard", sign=-1.0), "remove the beard",
                "the person is clean-shaven", "add a beard"),
)  # fmt: skip
TWO = "hat + eyeglasses"  # the composed edit: both must be read
LAMBDAS = {"b": (-100.0, -40.0, 0.0, 40.0, 100.0), "b0": (-10.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0),
           "b'": (0.0, 5.0, 10.0, 20.0, 50.0), "c": (2.0, 4.0, 8.0, 16.0)}  # fmt: skip
TAUS = {"b": TAU_M, "b0": 0.0, "b'": 0.0, "c": TAU_M}  # the keyword mask's threshold per mode (0: no mask)
MODES = {"a": "Kontext alone", "a'": "Kontext, unseen phrasing", "b": "Kontext + FluxSpace (instruction as base)",
         "b0": "Kontext + FluxSpace, no mask", "b'": "Kontext + FluxSpace (empty base, no mask)",
         "c": "FluxSpace on flux-mini via inversion"}  # fmt: skip


def faces(task: Task, n: int, evaluator, seed: int) -> list[tuple[dict, object]]:
    """n held-out faces, as (attributes, render), where the edit is due as the evaluator reads the render."""
    rng = np.random.default_rng([seed, len(task.name), ord(task.name[0])])
    out, i = [], 0
    while len(out) < n:
        attrs = sample_attributes(rng, "held_out")
        if task.removal:
            attrs = attrs.with_(task.family, next(v for v in FAMILIES[task.family] if v != "none"))
        image = render(attrs, UNSEEN_SEED + 1000 * seed + i, size=64)
        i += 1
        if i > 20 * n:
            raise RuntimeError(f"{task.name}: only {len(out)} of {n} faces need the edit")
        read = evaluator.score([image]).predicted[0]
        if read[task.family] != task.value:
            out.append((attrs, image))
    return out


class Runner:
    """Every mode's outputs for one face, from one plain Kontext run per base prompt."""

    def __init__(self, kontext, flux, settings: SampleSettings):
        self.kontext, self.flux, self.settings = kontext, flux, settings
        self._encoded = {}

    def encoded(self, models, spec: EditSpec):
        key = (id(models), tuple(c.prompt for c in spec.concepts), tuple(c.mask_words for c in spec.concepts))
        if key not in self._encoded:  # encoded once per concept prompt, whatever the strengths
            unit = EditSpec(concepts=tuple(Concept(c.prompt, 1.0, c.tau_m, c.mask_words) for c in spec.concepts))
            self._encoded[key] = encode_edit(unit, models.text)
        return self._encoded[key]

    def kontext_sweep(self, image, base: str, specs: list[EditSpec | None], seed: int) -> list:
        """Kontext on `image` with instruction `base`: one output per spec (None: the plain run)."""
        run = SamplingRun.prepare(self.kontext, [base], [seed], self.settings, progress=False, image=image)
        start = run.first_active_step(fine("any", 1.0))  # every spec here switches on at START
        plain, branch = run.plain_and_branch(start)
        n = run.inp.img.shape[1]
        latents = []
        for spec in specs:
            if spec is None or all(c.lambda_fine == 0 for c in spec.concepts):
                latents.append(plain)
                continue
            schedule = FluxSpaceSchedule(spec, self.encoded(self.kontext, spec), n_generated=n)
            latents.append(run.branch(start, branch, run.velocity(schedule, offset=start)))
        return run.decode(*latents)

    def inversion(self, image, attrs, spec: EditSpec):
        r = invert_image(self.flux, image, caption(attrs), settings=SampleSettings(steps=INVERSION_STEPS),
                         inversion=INVERSIONS[INVERSION], edit_spec=spec)  # fmt: skip
        return r.edited


def fine(prompt: str, lam: float, mask: str | None = None, *more: Concept, tau: float = TAU_M) -> EditSpec:
    """FluxSpace's fine edit along `prompt` (mask from the word `mask`, default the whole prompt), from START."""
    words = (mask,) if mask else None
    return EditSpec(concepts=(Concept(prompt, lam, tau, words), *more), start=START)


def case_rows(runner: Runner, kt: KontextTask, attrs, image, seed: int, modes: set[str]) -> list[dict]:
    """(mode, strength, output) for one face: every mode and lambda of the grid."""
    t = kt.task
    out = []
    if modes & {"a", "b", "b0"}:
        specs = [(m, lam) for m in ("b", "b0") if m in modes for lam in LAMBDAS[m]]
        imgs = runner.kontext_sweep(image, kt.instruction, [None] + [fine(t.keyword, lam, None, tau=TAUS[m])
                                                                    for m, lam in specs], seed)  # fmt: skip
        out += [("a", None, imgs[0])] if "a" in modes else []
        out += [(m, lam, im) for (m, lam), im in zip(specs, imgs[1:], strict=True)]
    if "a'" in modes:
        out.append(("a'", None, runner.kontext_sweep(image, kt.held_out, [None], seed)[0]))
    if "b'" in modes:
        lams = LAMBDAS["b'"]
        specs = [fine(kt.concept, t.sign * lam, t.keyword, tau=TAUS["b'"]) for lam in lams]
        out += [("b'", lam, im) for lam, im in zip(lams, runner.kontext_sweep(image, "", specs, seed), strict=True)]
    if "c" in modes:
        for lam in LAMBDAS["c"]:
            out.append(("c", lam, runner.inversion(image, attrs, fine(t.keyword, t.sign * lam, tau=TAUS["c"]))))
    return out


def two_concept_rows(runner: Runner, attrs, image, seed: int, lam: float) -> list[tuple[str, float | None, object]]:
    """The composed edit (hat + eyeglasses): (a) one instruction saying both; (b) the hat instruction
    + FluxSpace "eyeglasses"; (b') empty base + both instructions as concepts; (c) two concepts on inversion."""
    both = runner.kontext_sweep(image, "add a hat and eyeglasses", [None], seed)[0]
    hat_fs = runner.kontext_sweep(image, "add a hat", [fine("eyeglasses", lam)], seed)[0]
    empty = runner.kontext_sweep(image, "", [fine("add a hat", lam, "hat", Concept("add eyeglasses", lam, TAU_M,
                                                                                   ("eyeglasses",)))], seed)[0]  # fmt: skip
    inv = runner.inversion(image, attrs, fine("hat", lam, None, Concept("eyeglasses", lam, TAU_M)))
    return [("a", None, both), ("b", lam, hat_fs), ("b'", lam, empty), ("c", lam, inv)]


def score_two(evaluator, plain, edited) -> dict:
    scores = evaluator.score([plain, edited])
    before, after = scores.predicted
    others = [f for f in FAMILIES if f not in ("hat", "eyewear")]
    keep = ~(region("hat", plain.height) | region("eyewear", plain.height))
    return {"success": after["hat"] == "hat" and after["eyewear"] == "eyeglasses",
            "preservation": sum(before[f] == after[f] for f in others) / len(others),
            "feature": float(scores.embedding[0] @ scores.embedding[1]), "psnr_outside": psnr(plain, edited, keep),
            "text": float(scores.prob_of("hat", "hat")[1])}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Resumable rows


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is redone
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append whole lines, rewritten atomically, so a kill never leaves a torn line behind."""
    old = path.read_text() if path.exists() else ""
    with atomic_file(path, "w") as f:
        f.write(old + "".join(json.dumps(r) + "\n" for r in rows))


def summary(rows: list[dict]) -> dict:
    """{task: {mode: [{strength, summary}]}} in the order of MODES and the lambda grids."""
    out = {}
    for r in rows:
        out.setdefault(r["task"], {}).setdefault(r["mode"], {}).setdefault(r["strength"], []).append(r)
    return {task: {mode: [{"strength": s, "summary": summarise(rs)} for s, rs in per.items()]
                   for mode, per in sorted(modes.items(), key=lambda kv: list(MODES).index(kv[0]))}
            for task, modes in out.items()}  # fmt: skip


SLIDER = (-4.0, -3.0, -2.0, -1.0, 0.0)  # (b0)'s range where the strength acts on a Kontext edit


def slider(rows: list[dict], tolerance: float = 0.05) -> dict:
    """Per task, is (b0) a usable strength control? The share of faces whose evaluator probability of
    the target, p(target), falls monotonically (within `tolerance`) as lambda goes 0 -> -4, and of
    faces with an in-between output (0.1 < p < 0.9) somewhere on that path."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        per_face = {}
        for r in rows:
            if r["task"] == task and r["mode"] == "b0" and r["strength"] in SLIDER and r["success"] is not None:
                per_face.setdefault(r["face"], {})[r["strength"]] = r["text"]
        paths = [[p[lam] for lam in reversed(SLIDER)] for p in per_face.values() if len(p) == len(SLIDER)]
        if paths:
            monotone = [all(b <= a + tolerance for a, b in zip(q[:-1], q[1:], strict=True)) for q in paths]
            between = [any(0.1 < x < 0.9 for x in q) for q in paths]
            out[task] = {"faces": len(paths), "monotone": float(np.mean(monotone)), "in_between": float(np.mean(between))}
    return out


def table(data: dict) -> str:
    lines = []
    for task, modes in data.items():
        lines += [f"### {task}", "",
                  "| method | lambda | n | success % | preservation % | PSNR outside dB | p(target) % |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for mode, points in modes.items():
            for p in points:
                s = p["summary"]
                lam = "-" if p["strength"] is None else f"{p['strength']:g}"
                lines.append(f"| ({mode}) {MODES[mode]} | {lam} | {s['n']} | {fmt(s['success'])} | "
                             f"{fmt(s['preservation'])} | {fmt(s['psnr_outside'], False)} | {fmt(s['text'])} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


COLORS = {"b": "C0", "b0": "C1", "b'": "C2", "c": "C3"}  # one colour per mode in every panel


def plot(data: dict, path: Path) -> None:
    """Per task: success against lambda (top) and success against PSNR outside the region (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(data), figsize=(3.6 * len(data), 6.4), squeeze=False)
    for col, (task, modes) in enumerate(data.items()):
        top, bottom = axes[0][col], axes[1][col]
        for mode, points in modes.items():
            pts = [p for p in points if p["summary"]["success"]["mean"] is not None]
            succ = [p["summary"]["success"]["mean"] for p in pts]
            psnr = [p["summary"]["psnr_outside"]["mean"] for p in pts]
            if pts[0]["strength"] is None:  # one point: a horizontal line on top, a star below
                top.axhline(succ[0], ls="--", lw=1, color="k" if mode == "a" else "grey", label=f"({mode})")
                bottom.plot(succ, psnr, marker="*", ls="", ms=10, color="k" if mode == "a" else "grey", label=f"({mode})")
                continue
            lams = [p["strength"] for p in pts]
            top.plot(lams, succ, marker="o", color=COLORS[mode], label=f"({mode})")
            bottom.plot(succ, psnr, marker="o", color=COLORS[mode], label=f"({mode})")
            for x, y, lam in zip(succ, psnr, lams, strict=True):
                bottom.annotate(f"{lam:g}", (x, y), fontsize=6)
        top.set(title=task, xlabel="lambda", ylabel="success", ylim=(-0.02, 1.02))
        bottom.set(xlabel="success", ylabel="PSNR outside region (dB)", xlim=(-0.02, 1.02))
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kontext", default="flux-mini-kontext", help="the Kontext model (a shipped name or a file)")
    p.add_argument("--flux", default="flux-mini", help="the text-to-image model for (c)")
    p.add_argument("--faces", type=int, default=16, help="held-out faces per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=None, help="true-CFG scale (default: the preset's, 6 for flux-mini-kontext)")
    p.add_argument("--tasks", default=",".join([t.name for t in TASKS] + [TWO]))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--two-lambda", type=float, default=4.0, help="lambda of each FluxSpace concept in the composed edit")
    p.add_argument("--work", type=Path, default=Path("benchmarks/results/mini_kontext-work"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="2 faces per task: a check that everything runs")
    args = p.parse_args(argv)
    names = [t.name for t in TASKS] + [TWO]
    args.tasks = [s.strip() for s in args.tasks.split(",") if s.strip()]
    args.modes = {s.strip() for s in args.modes.split(",") if s.strip()}
    if bad := [t for t in args.tasks if t not in names]:
        p.error(f"unknown task(s) {', '.join(bad)}; valid: {', '.join(names)}")
    if bad := sorted(args.modes - set(MODES)):
        p.error(f"unknown mode(s) {', '.join(bad)}; valid: {', '.join(MODES)}")
    if args.faces < 1:
        p.error(f"--faces must be >= 1; got {args.faces}")
    if args.quick:
        args.faces = 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    kontext, flux = load_models(args.kontext), load_models(args.flux)
    evaluator = load_evaluator()
    settings = SampleSettings(cfg_scale=args.cfg)
    runner = Runner(kontext, flux, settings)
    args.work.mkdir(parents=True, exist_ok=True)
    rows_path = args.work / f"rows-{'quick' if args.quick else args.faces}-cfg{args.cfg}.jsonl"
    rows = load_rows(rows_path)
    done = {(r["task"], r["face"]) for r in rows}
    t0 = time.perf_counter()
    by_name = {t.name: t for t in TASKS}
    for name in args.tasks:
        task = by_name[name].task if name != TWO else Task(TWO, "hat", "hat", "hat")
        for i, (attrs, image) in enumerate(faces(task, args.faces, evaluator, args.seed)):
            if (name, i) in done:
                continue
            seed = 10_000 * args.seed + i
            if name == TWO:
                outs = two_concept_rows(runner, attrs, image, seed, args.two_lambda)
                scores = [score_two(evaluator, image, im) for _, _, im in outs]
            else:
                outs = case_rows(runner, by_name[name], attrs, image, seed, args.modes)
                scores = [score_pair(evaluator, task, image, im) for _, _, im in outs]
            new = [{"task": name, "face": i, "mode": m, "strength": lam, **s}
                   for (m, lam, _), s in zip(outs, scores, strict=True)]  # fmt: skip
            append_rows(rows_path, new)
            rows += new
            print(f"{name} face {i + 1}/{args.faces} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    data = summary(rows)
    result = {"benchmark": "mini_kontext", "kontext": args.kontext, "flux": args.flux, "faces": args.faces,
              "cfg_scale": args.cfg, "lambdas": LAMBDAS, "two_lambda": args.two_lambda, "start": START,
              "tau_m": TAU_M, "inversion": f"{INVERSION}@{INVERSION_STEPS}", "machine": machine_info("cpu"),
              "seconds": time.perf_counter() - t0, "results": data}  # fmt: skip
    result["slider"] = slider(rows)
    text = table(data) + "\n" + "\n".join(["### (b0) as a slider, lambda 0 -> -4", "",
                                    "| task | faces | p(target) monotone % | an in-between output % |", "|---|---|---|---|"]
                                   + [f"| {t} | {v['faces']} | {100 * v['monotone']:.0f} | {100 * v['in_between']:.0f} |"
                                      for t, v in result["slider"].items()]) + "\n"  # fmt: skip
    print(text)
    stem = "mini_kontext-quick" if args.quick else "mini_kontext"
    write_json(args.out / f"{stem}.json", result)
    write_text(args.out / f"{stem}.md", text)
    plot(data, args.out / f"{stem}-tradeoff.png")
    return result


if __name__ == "__main__":
    main()
