"""Choose the FluxSpace settings of mini_quality's local edits on tuning seeds, by a stated rule.

    python benchmarks/mini_tune_edits.py [--lambdas 2,4,6,8,12] [--seeds 24]

For each local edit, edit --seeds base images drawn with a tuning seed (mini_quality's edit section
with --seed TUNING_SEED: other prompts, other noise than the reported run) at each lambda_fine of
the grid and score success and preservation with the evaluator. The grid is tried masked first
(tau_m 0.5, on from t = 0.9: the paper's local edit); only an edit that no masked lambda carries to
the goal is also tried without the mask (tau_m 0, on from the first step, --unmasked-lambdas), with
the keyword as edit prompt and then, while none reaches it, each other phrase the captions write
the value with (captions.phrases: "a pair of eyeglasses").
Rule: the smallest lambda whose success reaches 80% while preservation stays >= 90%,
in the order tried; if none does, the setting with the best success among those keeping
preservation >= 90%.
The chosen values are what mini_quality.EDITS holds; this script prints the table it chose from
and writes it to benchmarks/results/mini_tune_edits.json.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mini_quality  # noqa: E402
from forward import RESULTS, write_json  # noqa: E402

from fluxspace import SampleSettings, load_models  # noqa: E402
from fluxspace.mini.captions import phrases  # noqa: E402
from fluxspace.mini.evaluator import load_evaluator  # noqa: E402

TUNING_SEED = 7  # mini_quality reports with --seed 0
SUCCESS_GOAL, PRESERVATION_FLOOR = 0.80, 0.90
MASKED = {"tau_m": 0.5, "start": 0.9}  # the local edit as the paper runs it
UNMASKED = {"tau_m": 0.0, "start": 1.0}  # fallback: the whole image, from the first step


def reaching(rows: list[dict]) -> dict | None:
    """The smallest-lambda row reaching the goal, or None."""
    ok = [r for r in rows if r["success"] is not None and r["success"] >= SUCCESS_GOAL
          and r["preservation"] >= PRESERVATION_FLOOR]  # fmt: skip
    return min(ok, key=lambda r: r["lambda_fine"]) if ok else None


def choose(rows: list[dict]) -> dict:
    """Rows in the order tried (grids of one setting and phrase each): the rule of the module docstring."""
    rows = [r for r in rows if r["success"] is not None]  # no base image lacked the attribute: nothing measured
    for grid in dict.fromkeys((r["tau_m"], r["start"], r["phrase"]) for r in rows):
        best = reaching([r for r in rows if (r["tau_m"], r["start"], r["phrase"]) == grid])
        if best:
            return best
    kept = [r for r in rows if r["preservation"] >= PRESERVATION_FLOOR]
    return max(kept or rows, key=lambda r: (r["success"] or 0.0, -r["lambda_fine"]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lambdas", default="2,4,6,8,12", help="lambda_fine grid with the mask")
    p.add_argument("--unmasked-lambdas", default="8,12,16,24", help="lambda_fine grid without it")
    p.add_argument("--seeds", type=int, default=24, help="base images per edit and lambda")
    p.add_argument("--edits", default=",".join(mini_quality.EDITS))
    args = p.parse_args(argv)
    masked, unmasked = ([float(x) for x in a.split(",")] for a in (args.lambdas, args.unmasked_lambdas))

    models, evaluator = load_models(), load_evaluator().eval()
    settings = SampleSettings()
    run_args = argparse.Namespace(edit_seeds=args.seeds, seed=TUNING_SEED, batch=16)
    table = {}
    for name in args.edits.split(","):
        base = mini_quality.EDITS[name]
        keyword, *others = phrases(base.family, base.value)
        grids = [(MASKED, keyword, masked)] + [(UNMASKED, phrase, unmasked) for phrase in (keyword, *others)]
        rows = []
        for setting, phrase, lambdas in grids:
            if reaching(rows):
                break  # an earlier grid reached the goal: no need for the fallbacks
            for lam in lambdas:
                mini_quality.EDITS[name] = dataclasses.replace(base, lambda_fine=lam, phrase=phrase, **setting)
                r = mini_quality.run_edit(models, evaluator, run_args, settings, name)
                rows.append({"lambda_fine": lam, **setting, "phrase": phrase, "success": r["success"],
                             "preservation": r["preservation"], "seeds": r["seeds"]})  # fmt: skip
                print(f"{name} {phrase!r} lambda {lam} tau_m {setting['tau_m']} start {setting['start']}: "
                      f"success {r['success']}, preservation {r['preservation']}", flush=True)  # fmt: skip
        mini_quality.EDITS[name] = base
        chosen = choose(rows)
        table[name] = {"rows": rows, "chosen": {k: chosen[k] for k in ("phrase", "lambda_fine", "tau_m", "start")}}
    rule = __doc__.split("Rule: ")[1].split(".\n")[0]
    path = RESULTS / "mini_tune_edits.json"
    if set(table) != set(mini_quality.EDITS) and path.is_file():  # a subset: update those edits only
        old = json.loads(path.read_text())
        if (old.get("rule"), old.get("tuning_seed")) == (rule, TUNING_SEED):
            table = {name: table[name] if name in table else old["edits"][name] for name in mini_quality.EDITS
                     if name in table or name in old["edits"]}  # fmt: skip
    write_json(path, {"rule": rule, "tuning_seed": TUNING_SEED, "edits": table})
    for name, t in table.items():
        cells = ", ".join(f"{r['lambda_fine']:g}{'' if r['tau_m'] else ' unmasked ' + repr(r['phrase'])}: "
                          f"{r['success'] or 0:.2f}/{r['preservation'] or 0:.2f}" for r in t["rows"])  # fmt: skip
        c = t["chosen"]
        print(f"{name}: chosen {c['phrase']!r}, lambda {c['lambda_fine']:g}, tau_m {c['tau_m']:g}, start {c['start']:g}  ({cells})")
    return table


if __name__ == "__main__":
    main()
