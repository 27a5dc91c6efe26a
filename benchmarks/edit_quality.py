"""Edit quality on flux-mini: FluxSpace against baselines, the paper's Table 1 in miniature (issue 5).

    python benchmarks/edit_quality.py [--seeds 128] [--tune-seeds 32] [--out benchmarks/results]
    torchrun --nproc_per_node N benchmarks/edit_quality.py ...     (sharded; gloo on CPUs, NCCL on GPUs)

For every edit task (TASKS) and every base image (a prompt stating a random identity, and a seed),
each method (METHODS) edits the same unedited image: same prompt, same noise, and for the methods
that act during sampling the same branch point (the plain run's latent at START). The attribute
evaluator (evaluator.py) reads the unedited and the edited image:

- success: the target value is read after the edit (for a removal: the attribute is gone). Base
  images are screened first: of at most SCREEN_FACTOR x --seeds candidates, the first --seeds on
  which the evaluator does not already read the target are used; every metric is averaged over them;
- preservation: the share of the other eight families read unchanged;
- feature similarity: cosine of the evaluator's embeddings, edited vs unedited (for CLIP-I / DINO);
- PSNR outside the region the edit may touch (fluxspace.mini's region; the whole image for the global style);
- text alignment: the evaluator's probability of the target value (for CLIP-T).

Each method's strength (lambda_fine, or lambda_coarse for coarse-only) is chosen per task on
separate tuning seeds by one rule: the smallest strength reaching TUNE_SUCCESS success, else the
one with the highest success. The tuning sweep also gives the trade-off curves. The table gives the
mean and a 95% bootstrap interval (1,000 resamples of the base images) of every cell.

Work is split into units of (phase, task, base image); under torchrun rank r takes every world-th
unit and writes its rows to shards/; rank 0 merges, sorted, so the result does not depend on the
number of processes (bit for bit at equal torch thread counts).
"""

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flux_core.atomic import atomic_file
from fluxspace import FluxSpaceSchedule, SampleSettings, SamplingRun, load_models
from fluxspace.baselines import DirectionVelocity
from fluxspace.distributed import barrier, world
from fluxspace.images import psnr, save_png, side_by_side, stacked
from fluxspace.mini.attributes import FAMILIES, KIND, sample_attributes
from fluxspace.mini.captions import KEYWORD, prompt_for
from fluxspace.mini.evaluator import load_evaluator
from fluxspace.mini.regions import region
from fluxspace.spec import Concept, EditSpec, encode_edit

START = 0.9  # time t at which every sampling-time edit switches on (t = 1 noise, 0 data)
TUNE_SUCCESS = 0.8
BOOTSTRAP = 1000
IDENTITY = ("skin", "hair", "face", "background")
REPORT_SEED, TUNE_SEED = 0, 1  # prompt/noise seed families of the two phases
GRID_ROWS = 4
SCREEN_FACTOR = 3  # candidates screened per base image wanted


@dataclass(frozen=True)
class Task:
    """One edit: the family it changes, the value it should produce, the edit prompt."""

    name: str
    family: str
    value: str  # after the edit; "none" for a removal
    keyword: str  # the edit prompt: the captions' canonical keyword
    sign: float = 1.0  # -1: a removal (negative lambda)

    @property
    def removal(self) -> bool:
        return self.sign < 0


TASKS = (
    Task("eyeglasses", "eyewear", "eyeglasses", "eyeglasses"),
    Task("hat", "hat", "hat", "hat"),
    Task("smile", "mouth", "smile", "smile"),
    Task("remove beard", "beard", "none", "beard", sign=-1.0),
    Task("sketch", "style", "sketch", "sketch"),
)


@dataclass(frozen=True)
class Method:
    key: str
    name: str
    kind: str  # "prompt" | "direction" | "fluxspace"
    fine: bool = True
    lambda_coarse: float = 0.0  # fixed coarse strength beside a tuned fine one (method d)
    tau_m: float = 0.5
    prior_removal: str = "orthogonal"
    strengths: tuple[float, ...] = ()  # the tuned |lambda| grid; empty: nothing to tune

    def spec(self, task: Task, strength: float) -> EditSpec:
        fine = task.sign * strength if self.fine else 0.0
        coarse = task.sign * (self.lambda_coarse if self.fine else strength)
        tau = self.tau_m if self.fine and self.kind == "fluxspace" else 0.0
        return EditSpec(concepts=(Concept(task.keyword, fine, tau),), lambda_coarse=coarse, start=START,
                        prior_removal=self.prior_removal)  # fmt: skip


FINE = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0)
METHODS = (
    Method("a", "prompt change", "prompt"),
    Method("b", "output-level direction", "direction", strengths=(0.5, 1.0, 2.0, 3.0, 4.0, 6.0)),
    Method("c", "FluxSpace fine", "fluxspace", strengths=FINE),
    Method("d", "FluxSpace fine + coarse", "fluxspace", lambda_coarse=0.5, strengths=FINE),
    Method("e", "FluxSpace, no mask", "fluxspace", tau_m=0.0, strengths=FINE),
    Method("f", "FluxSpace, no projection", "fluxspace", prior_removal="none", strengths=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0)),
    Method("g", "FluxSpace coarse only", "fluxspace", fine=False, strengths=(0.25, 0.5, 0.75, 1.0, 1.5)),
)
CURVES = ("b", "c", "d")


# ----------------------------------------------------------------------------------------------
# Base images


def base_facts(task: Task, n: int, phase_seed: int) -> list[dict[str, str]]:
    """n stated-fact sets: a random identity, plus the attribute itself for a removal."""
    rng = np.random.default_rng([phase_seed, TASKS.index(task)])
    facts = []
    for _ in range(n):
        attrs = sample_attributes(rng).as_dict()
        stated = {f: attrs[f] for f in IDENTITY}
        if task.removal:
            stated[task.family] = next(v for v in FAMILIES[task.family] if v != "none")
        facts.append(stated)
    return facts


def noise_seed(task: Task, phase_seed: int, i: int) -> int:
    return 1_000_000 * (1 + phase_seed) + 10_000 * TASKS.index(task) + i


def edited_prompt(task: Task, facts: dict[str, str]) -> tuple[str, str | None]:
    """The prompt-change baseline: (new prompt, negative prompt or None)."""
    if task.removal:
        return prompt_for({f: v for f, v in facts.items() if f != task.family}), KEYWORD[task.family, "beard"]
    return prompt_for({**facts, task.family: task.value}), None


# ----------------------------------------------------------------------------------------------
# One base image, every setting


class Editor:
    """Runs every (method, strength) setting on one base image from one plain run."""

    def __init__(self, models, settings: SampleSettings):
        self.models, self.settings = models, settings.resolved(models.preset)
        self._encoded = {}

    def encoded(self, spec: EditSpec):
        key = (spec.concepts[0].prompt, spec.prior_prompt)
        if key not in self._encoded:
            # Encoded once per edit prompt, with both edits on, whatever the strengths of this spec.
            full = EditSpec(concepts=(Concept(key[0], 1.0),), lambda_coarse=1.0, prior_prompt=key[1])
            self._encoded[key] = encode_edit(full, self.models.text)
        return self._encoded[key]

    def images(self, task: Task, facts: dict[str, str], seed: int, settings: list[tuple[Method, float]]):
        """[unedited, edited per setting] as PIL images."""
        models = self.models
        run = SamplingRun.prepare(models, [prompt_for(facts)], [seed], self.settings, progress=False)
        start = run.first_active_step(EditSpec(concepts=(Concept(task.keyword),), start=START))
        plain, branch = run.plain_and_branch(start)
        latents = [plain]
        for method, strength in settings:
            spec = method.spec(task, strength)
            if method.kind == "prompt":
                latents.append(run.with_prompt(*edited_prompt(task, facts)))
            elif method.kind == "direction":
                latents.append(run.branch(start, branch, DirectionVelocity(run, spec, offset=start)))
            else:
                schedule = FluxSpaceSchedule(spec, self.encoded(spec))
                latents.append(run.branch(start, branch, run.velocity(schedule, offset=start)))
        return run.decode(*latents)


# ----------------------------------------------------------------------------------------------
# Metrics


def score_pair(evaluator, task: Task, plain, edited) -> dict:
    """The metrics of one edit; success is None where the target was already there."""
    scores = evaluator.score([plain, edited])
    before, after = scores.predicted
    others = [f for f in FAMILIES if f != task.family]
    keep = ~region(task.family, plain.height) if KIND[task.family] == "local" else None
    return {
        "success": None if before[task.family] == task.value else after[task.family] == task.value,
        "preservation": sum(before[f] == after[f] for f in others) / len(others),
        "feature": float(scores.embedding[0] @ scores.embedding[1]),
        "psnr_outside": psnr(plain, edited, keep),
        "text": float(scores.prob_of(task.family, task.value)[1]),
    }


METRICS = ("success", "preservation", "feature", "psnr_outside", "text")


def summarise(rows: list[dict], seed: int = 0) -> dict:
    """Mean and 95% bootstrap interval of every metric over the rows where an edit was due."""
    due = [r for r in rows if r["success"] is not None]
    out = {"n": len(due), "skipped": len(rows) - len(due)}
    rng = np.random.default_rng(seed)
    for m in METRICS:
        x = np.array([float(r[m]) for r in due])
        if not len(x):
            out[m] = {"mean": None, "low": None, "high": None}
            continue
        means = x[rng.integers(len(x), size=(BOOTSTRAP, len(x)))].mean(1)
        out[m] = {"mean": float(x.mean()), "low": float(np.percentile(means, 2.5)), "high": float(np.percentile(means, 97.5))}
    return out


def choose_strength(method: Method, by_strength: dict[float, dict]) -> float:
    """The tuning rule: smallest strength with success >= TUNE_SUCCESS, else the highest success."""
    rates = {s: v["success"]["mean"] for s, v in by_strength.items() if v["success"]["mean"] is not None}
    if not rates:
        return method.strengths[len(method.strengths) // 2]
    reaching = [s for s, r in rates.items() if r >= TUNE_SUCCESS]
    return min(reaching) if reaching else max(rates, key=lambda s: (rates[s], -s))


# ----------------------------------------------------------------------------------------------
# Units of work, sharding


@dataclass(frozen=True)
class Unit:
    phase: str  # "tune" | "report"
    task: int
    index: int


def run_units(units: list[Unit], editor: Editor, evaluator, plan, rank: int, size: int, progress: bool) -> list[dict]:
    """This rank's share of `units`; plan(unit) -> [(method, strength)] settings to run."""
    mine = units[rank::size]
    rows = []
    t0 = time.monotonic()
    for k, unit in enumerate(mine):
        task = TASKS[unit.task]
        phase_seed = TUNE_SEED if unit.phase == "tune" else REPORT_SEED
        facts = base_facts(task, unit.index + 1, phase_seed)[unit.index]
        seed = noise_seed(task, phase_seed, unit.index)
        settings = plan(unit)
        images = editor.images(task, facts, seed, settings)
        if not settings:  # screening: is an edit due on this base image?
            read = evaluator.score(images[:1]).predicted[0][task.family]
            rows.append({"phase": unit.phase, "task": task.name, "method": "", "strength": 0.0,
                         "index": unit.index, "seed": seed, "due": read != task.value})  # fmt: skip
        for (method, strength), edited in zip(settings, images[1:], strict=True):
            rows.append({"phase": unit.phase, "task": task.name, "method": method.key, "strength": strength,
                         "index": unit.index, "seed": seed} | score_pair(evaluator, task, images[0], edited))  # fmt: skip
        if progress:
            print(f"[rank {rank}] {unit.phase} {k + 1}/{len(mine)} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows


def write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def gather(rows: list[dict], folder: Path, name: str, rank: int, size: int) -> list[dict]:
    """Every rank's rows, in a fixed order (each rank writes its shard; all read all after a barrier)."""
    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    write_text(shards / f"{name}-rank{rank}-of{size}.json", json.dumps(rows))
    barrier(size)
    merged = [r for k in range(size) for r in json.loads((shards / f"{name}-rank{k}-of{size}.json").read_text())]
    return sorted(merged, key=lambda r: (r["phase"], r["task"], r["method"], r["strength"], r["index"]))


# ----------------------------------------------------------------------------------------------
# Outputs


def fmt(cell: dict, pct: bool = True) -> str:
    if cell["mean"] is None:
        return "-"
    if pct:
        return f"{100 * cell['mean']:.1f} [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"
    return f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def table(results: dict) -> str:
    lines = []
    for task, per_method in results.items():
        lines += [f"### {task}", "", "| method | strength | n | success % | preservation % | feature cos | "
                  "PSNR outside dB | text prob |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, r in per_method.items():
            m = next(m for m in METHODS if m.key == key)
            s = r["summary"]
            psnr = "-" if s["psnr_outside"]["mean"] is None else (
                f"{s['psnr_outside']['mean']:.1f} [{s['psnr_outside']['low']:.1f}, {s['psnr_outside']['high']:.1f}]")
            lines.append(f"| ({m.key}) {m.name} | {r['strength'] if m.strengths else '-'} | {s['n']} | "
                         f"{fmt(s['success'])} | {fmt(s['preservation'])} | {fmt(s['feature'], False)} | {psnr} | "
                         f"{fmt(s['text'], False)} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def tradeoff_plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False)
    for ax, (task, per_method) in zip(axes[0], curves.items(), strict=True):
        for key, points in per_method.items():
            m = next(m for m in METHODS if m.key == key)
            xs = [p["success"] for p in points if p["success"] is not None]
            ys = [p["preservation"] for p in points if p["success"] is not None]
            ax.plot(xs, ys, marker="o", label=f"({m.key}) {m.name}")
            for p in points:
                if p["success"] is not None:
                    ax.annotate(f"{p['strength']:g}", (p["success"], p["preservation"]), fontsize=6)
        ax.set(title=task, xlabel="success", ylabel="preservation", xlim=(-0.02, 1.02), ylim=(0.5, 1.01))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def grids(editor: Editor, tasks, methods, chosen: dict, folder: Path, indices: dict[str, list[int]]) -> list[Path]:
    """Per task: rows = the given report base images; columns = unedited, then each method as reported."""
    paths = []
    for task in tasks:
        settings = [(m, chosen[task.name][m.key]) for m in methods]
        lines = []
        for i in indices[task.name]:
            facts = base_facts(task, i + 1, REPORT_SEED)[i]
            images = editor.images(task, facts, noise_seed(task, REPORT_SEED, i), settings)
            lines.append(side_by_side([im.resize((128, 128)) for im in images]))
        grid = stacked(lines)
        header = "unedited | " + " | ".join(f"({m.key})" for m in methods)
        path = folder / f"edit_quality-grid-{task.name.replace(' ', '_')}.png"
        paths.append(save_png(grid, path, {"task": task.name, "columns": header, "strengths": chosen[task.name]}))
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/edit_quality.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seeds", type=int, default=128, help="reported base images per task")
    p.add_argument("--tune-seeds", type=int, default=32, help="tuning base images per task (other seeds)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's)")
    p.add_argument("--model", default=None, help="model folder (default: the shipped flux-mini)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the results")
    p.add_argument("--tasks", default=",".join(t.name for t in TASKS), help="comma-separated subset of the tasks")
    p.add_argument("--methods", default="".join(m.key for m in METHODS), help="subset of method keys, e.g. acd")
    p.add_argument("--strengths", type=int, default=None, help="use only the first N strengths of each grid")
    p.add_argument("--grid-rows", type=int, default=GRID_ROWS, help="base images in each example grid (0: none)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    names = [t.name for t in TASKS]
    bad = [t for t in args.tasks.split(",") if t not in names]
    if bad:
        p.error(f"unknown task(s) {', '.join(map(repr, bad))}; valid: {', '.join(names)}")
    bad = [k for k in args.methods if k not in {m.key for m in METHODS}]
    if bad:
        p.error(f"unknown method key(s) {', '.join(bad)}; valid: {''.join(m.key for m in METHODS)}")
    for name in ("seeds", "tune_seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    rank, size = world()
    tasks = [t for t in TASKS if t.name in args.tasks.split(",")]
    methods = [
        dataclasses.replace(m, strengths=m.strengths[: args.strengths] if args.strengths else m.strengths)
        for m in METHODS if m.key in args.methods
    ]  # fmt: skip
    models = load_models(args.model)
    evaluator = load_evaluator().eval()
    editor = Editor(models, SampleSettings(steps=args.steps))
    progress = not args.quiet and rank == 0
    t0 = time.monotonic()

    def screened(phase: str, n: int) -> list[Unit]:
        """The first n base images of each task on which the edit is due (the evaluator reads the
        unedited image without the target value), among at most SCREEN_FACTOR * n candidates.
        Candidates are screened in rounds of ceil(n / 2) per task, only for the tasks still short,
        so the choice is the same as screening them all, at a fraction of the cost."""
        chunk, due = -(-n // 2), {t.name: [] for t in tasks}
        for r in range(-(-SCREEN_FACTOR * n // chunk)):
            short = [t for t in tasks if len(due[t.name]) < n]
            if not short:
                break
            indices = range(r * chunk, min((r + 1) * chunk, SCREEN_FACTOR * n))
            units = [Unit(phase, TASKS.index(t), i) for t in short for i in indices]
            rows = gather(run_units(units, editor, evaluator, lambda u: [], rank, size, progress), args.out,
                          f"screen-{phase}-{r}", rank, size)  # fmt: skip
            for row in sorted(rows, key=lambda row: row["index"]):
                if row["due"]:
                    due[row["task"]].append(row["index"])
        return [Unit(phase, TASKS.index(t), i) for t in tasks for i in due[t.name][:n]]

    # 1. tuning: every strength of every method, on the tuning base images
    units = screened("tune", args.tune_seeds)
    sweep = [(m, s) for m in methods for s in m.strengths]
    tune_rows = run_units(units, editor, evaluator, lambda u: sweep, rank, size, progress)
    tune_rows = gather(tune_rows, args.out, "tune", rank, size)
    chosen, curves = {}, {}
    for task in tasks:
        chosen[task.name], curves[task.name] = {}, {}
        for m in methods:
            by_strength = {s: summarise([r for r in tune_rows if r["task"] == task.name and r["method"] == m.key
                                         and r["strength"] == s]) for s in m.strengths}  # fmt: skip
            chosen[task.name][m.key] = choose_strength(m, by_strength) if m.strengths else 0.0
            if m.key in CURVES:
                curves[task.name][m.key] = [{"strength": s, "success": v["success"]["mean"],
                                             "preservation": v["preservation"]["mean"]} for s, v in by_strength.items()]  # fmt: skip

    # 2. report: each method at its chosen strength, on the reported base images
    units = screened("report", args.seeds)

    def plan(u: Unit):
        return [(m, chosen[TASKS[u.task].name][m.key]) for m in methods]

    rows = gather(run_units(units, editor, evaluator, plan, rank, size, progress), args.out, "report", rank, size)
    if rank != 0:
        return None
    results = {
        task.name: {m.key: {"strength": chosen[task.name][m.key],
                            "summary": summarise([r for r in rows if r["task"] == task.name and r["method"] == m.key])}
                    for m in methods}
        for task in tasks
    }  # fmt: skip
    data = {"benchmark": "edit_quality", "world_size": size, "threads": torch.get_num_threads(),
            "seeds": args.seeds, "tune_seeds": args.tune_seeds, "steps": editor.settings.steps, "start": START,
            "tune_success": TUNE_SUCCESS, "chosen": chosen,
            "curves": curves, "results": results, "rows": rows, "tune_rows": tune_rows,
            "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "edit_quality.json", json.dumps(data, indent=1))
    has_curves = any(curves.values())
    if has_curves:
        tradeoff_plot(curves, args.out / "edit_quality-tradeoff.png")
    grid_paths = []
    if args.grid_rows:
        shown = {t.name: [u.index for u in units if TASKS[u.task] == t][: args.grid_rows] for t in tasks}
        grid_paths = grids(editor, tasks, methods, chosen, args.out, shown)
    report = markdown(data, methods, has_curves, grid_paths, argv if argv is not None else sys.argv[1:])
    write_text(args.out / "edit_quality.md", report)
    print(table(results))
    return data


def markdown(data: dict, methods, has_curves: bool, grid_paths: list[Path], argv: list[str]) -> str:
    """The report: how it was made, the table, the plot and the grids."""
    size = data["world_size"]
    threads = f"OMP_NUM_THREADS={data['threads']} " if "threads" in data else ""
    launcher = "python" if size == 1 else f"{threads}torchrun --standalone --nproc_per_node {size}"
    command = f"{launcher} benchmarks/edit_quality.py {' '.join(argv)}".rstrip()
    lines = [
        "# Edit quality on flux-mini: FluxSpace against baselines",
        "",
        f"Regenerate: `{command}` (benchmarks/edit_quality.py explains every metric). Deterministic: the "
        "same command gives the same numbers, for any process count at the same threads per process.",
        "",
        f"{data['seeds']} reported base images per task (screened: the evaluator reads the unedited image without "
        f"the target), {data['tune_seeds']} other ones for tuning; {data['steps']} steps; sampling-time edits from "
        f"t = {data['start']}; each method's strength is the smallest of its grid reaching "
        f"{100 * data['tune_success']:.0f}% success on the tuning images, else its most successful one. "
        f"Cells: mean [95% bootstrap interval]. Wall time {data['seconds'] / 60:.1f} min on {data['world_size']} "
        "process(es).",
        "",
        "Methods: " + "; ".join(f"({m.key}) {m.name}" for m in methods) + ".",
        "",
        table(data["results"]),
    ]
    if has_curves:
        lines += ["## Trade-off (tuning images, strength annotated)", "", "![trade-off](edit_quality-tradeoff.png)", ""]
    if grid_paths:
        lines += ["## Examples (rows: base images; columns: unedited, then " + ", ".join(f"({m.key})" for m in methods)
                  + ")", ""]  # fmt: skip
        lines += [f"![{p.stem}]({p.name})" for p in grid_paths]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
