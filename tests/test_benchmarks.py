"""Smoke tests of the benchmark scripts at toy size: they run, agree with diffusers, and write the JSON
a reader of benchmarks/results/ relies on. No timing assertions: CI machines are shared."""

import json

import pytest
from scripts import load_script

forward = load_script("forward")
load_memory = load_script("load_memory")
flux2_forward = load_script("flux2_forward")
edit_cost = load_script("edit_cost")

TINY_FORWARD = ["--preset", "tiny", "--height", "32", "--width", "48", "--txt-len", "5", "--device", "cpu"]
TINY_FORWARD += ["--warmup", "0", "--iters", "1"]


def test_forward_runs_both_models_and_writes_json(tmp_path, capsys):
    out = tmp_path / "forward.json"
    forward.main([*TINY_FORWARD, "--no-compile", "--out", str(out)])
    data = json.loads(out.read_text())

    s = data["settings"]
    assert (s["preset"], s["image_tokens"], s["txt_tokens"], s["batch"], s["dtype"]) == (
        "tiny",
        6,
        5,
        1,
        "float32",
    )
    assert s["params"]["hidden_size"] == 64 and s["parameters"] > 0
    assert {"cpu", "cpu_count", "torch", "torch_threads"} <= data["machine"].keys()
    assert data["reference"] == "diffusers eager"

    rows = {(r["model"], r["mode"]): r for r in data["results"]}
    assert rows.keys() == {("ours", "eager"), ("diffusers", "eager")}
    for r in rows.values():
        assert r["status"] == "ok", r.get("traceback")
        assert len(r["times_ms"]) == 1 and r["median_ms"] == r["min_ms"] == r["times_ms"][0] > 0
        assert r["weights_bytes"] > 0 and r["forward_peak_bytes"] >= 0
        assert r["memory_method"].startswith("VmHWM after clear_refs")
    # The same function: our model matches diffusers on the same random weights.
    assert rows["ours", "eager"]["rel_err"] <= 1e-5
    assert rows["diffusers", "eager"]["rel_err"] == 0.0
    assert rows["diffusers", "eager"]["ratio_to_diffusers_eager"] == 1.0
    assert rows["diffusers", "eager"]["converter"] == "flux_core.formats"  # tiny is not 3072 wide

    table = capsys.readouterr().out
    assert "| ours | eager |" in table and "| diffusers | eager |" in table


def test_forward_reports_a_failing_worker_instead_of_crashing(tmp_path, capsys):
    out = tmp_path / "forward.json"
    data = forward.main(
        [*TINY_FORWARD, "--models", "ours", "--compile-mode", "not-a-mode", "--out", str(out)]
    )
    rows = {(r["model"], r["mode"]): r for r in json.loads(out.read_text())["results"]}
    assert rows.keys() == {("ours", "eager"), ("ours", "compiled"), ("ours", "regional")}
    assert rows["ours", "eager"]["status"] == "ok"
    for mode in ("compiled", "regional"):  # whole-model and regional compile both report the failure
        assert rows["ours", mode]["status"] == "failed"
        assert "Unrecognized mode=not-a-mode" in rows["ours", mode]["error"]
    assert data["reference"] == "ours eager"
    assert "failed: RuntimeError: Unrecognized mode=not-a-mode" in capsys.readouterr().out


def test_forward_refuses_bad_settings():
    with pytest.raises(ValueError, match="unknown preset 'flux-pro'; valid presets: "):
        forward.parse_args(["--preset", "flux-pro"])
    with pytest.raises(ValueError, match="height 500 is not a multiple of 16; nearest valid: 496 or 512"):
        forward.parse_args(["--height", "500"])
    with pytest.raises(ValueError, match=r"unknown --models \['theirs'\]; valid: ours, diffusers"):
        forward.parse_args(["--models", "ours,theirs", "--device", "cpu"])


def test_forward_default_output_names_the_shape():
    args = forward.parse_args(
        ["--preset", "flux-dev", "--depth", "2", "--depth-single", "4", "--device", "cpu"]
    )
    assert forward.default_out(args).name == "forward-cpu-flux-dev-1024x1024-d2s4.json"
    args = forward.parse_args(
        ["--preset", "flux-schnell", "--height", "512", "--width", "768", "--device", "cpu"]
    )
    assert forward.default_out(args).name == "forward-cpu-flux-schnell-512x768.json"
    assert args.txt_len == 256  # the preset's T5 length


def test_load_memory_loads_each_dtype_and_writes_json(tmp_path, capsys):
    out = tmp_path / "load.json"
    load_memory.main(["--preset", "tiny", "--tmp", str(tmp_path), "--out", str(out)])
    data = json.loads(out.read_text())

    assert data["settings"]["preset"] == "tiny" and data["settings"]["file_dtype"] == "bfloat16"
    assert data["checkpoint"]["file_name"] == "flux1-tiny.safetensors"
    assert {"cpu", "cpu_count", "memory_bytes", "torch"} <= data["machine"].keys()
    rows = {r["target_dtype"]: r for r in data["results"]}
    assert rows.keys() == {"bfloat16", "float32"}
    for dtype, itemsize in (("bfloat16", 2), ("float32", 4)):
        r = rows[dtype]
        assert r["status"] == "ok", r.get("traceback")
        assert r["loaded_dtypes"] == [dtype]
        assert r["model_bytes"] == r["parameters"] * itemsize
        for key in ("peak_rss_bytes", "peak_anon_bytes", "after_load_anon_bytes", "after_touch_file_bytes"):
            assert isinstance(r[key], int)
    # The bf16 file holds the model's bytes plus a header.
    assert 0 < data["checkpoint"]["file_bytes"] - rows["bfloat16"]["model_bytes"] < 100_000
    assert list(tmp_path.iterdir()) == [out]  # the temporary checkpoint is gone
    assert "| float32 |" in capsys.readouterr().out


def test_mini_kontext_slider_reads_monotone_and_in_between_paths():
    mini_kontext = load_script("mini_kontext")

    def rows(face, probs, task="hat"):  # p(target) at lambda -4, -3, -2, -1, 0
        return [{"task": task, "face": face, "mode": "b0", "strength": lam, "success": p > 0.5, "text": p}
                for lam, p in zip((-4.0, -3.0, -2.0, -1.0, 0.0), probs, strict=True)]  # fmt: skip

    data = rows(0, [0.0, 0.0, 0.5, 1.0, 1.0]) + rows(1, [1.0, 0.0, 1.0, 1.0, 1.0]) + rows(2, [0.0, 0.0, 0.0, 0.0, 0.97])
    data += [{"task": "hat", "face": 3, "mode": "b0", "strength": 0.0, "success": True, "text": 1.0}]  # incomplete: left out
    assert mini_kontext.slider(data) == {"hat": {"faces": 3, "monotone": 2 / 3, "in_between": 1 / 3}}


# FLUX.2 at klein 4B's head layout (head dim 128, 4 rope axes), 256 wide, 1 + 1 blocks: seconds on a CPU.
TINY_FLUX2 = ["--preset", "flux2-klein-4b", "--hidden", "256", "--heads", "2", "--height", "32", "--width", "48"]
TINY_FLUX2 += ["--txt-len", "5", "--device", "cpu"]


def test_flux2_forward_runs_ours_and_diffusers_alike(tmp_path, capsys):
    out = tmp_path / "flux2_forward.json"
    data = flux2_forward.main([*TINY_FLUX2, "--width-blocks", "1,1", "--iters", "1", "--no-compile", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == data["results"]
    s = data["settings"]
    assert (s["image_tokens"], s["text_tokens"], s["dtype"]) == (6, 5, "float32")
    assert (s["params"]["hidden_size"], s["params"]["depth"], s["params"]["depth_single_blocks"]) == (256, 1, 1)
    assert data["reference"] == "diffusers eager" and {"cpu", "torch"} <= data["machine"].keys()
    rows = {(r["model"], r["mode"]): r for r in data["results"]}
    assert rows.keys() == {("ours", "eager"), ("diffusers", "eager")}
    assert all(r["status"] == "ok" and len(r["times_ms"]) == 1 for r in rows.values())
    assert rows["ours", "eager"]["rel_err"] <= 1e-5  # the same function as diffusers on the same weights
    assert "| ours | eager |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--width-blocks takes D,S"):
        flux2_forward.parse_args(["--width-blocks", "2"])
    with pytest.raises(KeyError, match="unknown FLUX.2 size 'flux2-pro'"):
        flux2_forward.parse_args(["--preset", "flux2-pro"])


def test_edit_cost_runs_the_fine_edit_on_flux2(tmp_path):
    out = tmp_path / "edit_cost.json"
    data = edit_cost.main([*TINY_FLUX2, "--depth", "1", "--depth-single", "1", "--rounds", "1", "--out", str(out)])
    assert data["settings"]["model"] == "FLUX.2"
    rows = [r["row"] for r in data["rows"]]
    assert rows == ["plain", "fluxspace", "two-concepts", "reference", "naive-batch3"]  # no coarse rows
    assert all(r["median_ms"] > 0 for r in data["rows"])


def test_memory_estimates_are_the_readmes(tmp_path, capsys):
    """benchmarks/memory_estimates.py prints the estimate fluxspace checks before loading, per mode; the
    README's two GPU tables (FLUX.1-dev; FLUX.2 klein 4B, 9B and dev) are its output, figure for figure."""
    from pathlib import Path

    memory_estimates = load_script("memory_estimates")
    data = memory_estimates.main(["--out", str(tmp_path / "m.json")])
    totals = {r["preset"]: [f"{row['total_gib']:.1f} GiB" for row in r["rows"]] for r in data["results"]}
    for rows in totals.values():  # each mode needs less than the one before it, or the same
        assert [float(t.split()[0]) for t in rows] == sorted((float(t.split()[0]) for t in rows), reverse=True)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flux1 = [line.split("|")[3].strip().split(" (")[0] for line in readme.splitlines()
             if line.startswith("| ") and "GiB" in line and line.count("|") == 5]  # fmt: skip
    assert flux1 == totals["flux-dev"]
    flux2 = [[cell.strip().split(" (")[0] for cell in line.split("|")[3:6]] for line in readme.splitlines()
             if line.startswith("| ") and "GiB" in line and line.count("|") == 6]  # fmt: skip
    columns = (totals["flux2-klein-4b"], totals["flux2-klein-9b"], totals["flux2-dev"])
    assert flux2 == [list(t) for t in zip(*columns, strict=True)]
    capsys.readouterr()
