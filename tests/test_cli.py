"""The fluxspace command end to end on a random tiny checkpoint set, and its refusals."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from flux_core.atomic import atomic_file
from fluxspace.cli import main
from fluxspace.images import read_png_params

SMALL = ["--width", "64", "--height", "48", "--steps", "3", "--quiet"]


def pixels(path):
    return np.asarray(Image.open(path))


def test_generate_writes_pngs_with_parameters(tiny_checkpoint, tmp_path):
    out = tmp_path / "gen.png"
    assert main(["generate", "a red bicycle", "--model", str(tiny_checkpoint.transformer), "--seed", "3", "4", "--out", str(out), *SMALL]) == 0
    a, b = tmp_path / "gen-0.png", tmp_path / "gen-1.png"
    assert Image.open(a).size == (64, 48)
    params = read_png_params(a)
    assert params["prompt"] == "a red bicycle" and params["seed"] == 3 and params["steps"] == 3
    assert params["preset"] == "tiny" and params["guidance"] == 3.5
    assert read_png_params(b)["seed"] == 4
    assert not np.array_equal(pixels(a), pixels(b))
    # Same seed, same image, whatever the batch around it.
    single = tmp_path / "single.png"
    main(["generate", "a red bicycle", "--model", str(tiny_checkpoint.transformer), "--seed", "3", "--out", str(single), *SMALL])
    assert np.array_equal(pixels(single), pixels(a))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file's mode, not mkstemp's private 0600


def test_generate_with_true_cfg(tiny_checkpoint, tmp_path):
    out = tmp_path / "cfg.png"
    main(["generate", "a cat", "--model", str(tiny_checkpoint.text_encoders), "--cfg-scale", "3", "--negative-prompt", "blurry", "--out", str(out), *SMALL])
    assert read_png_params(out)["cfg_scale"] == 3.0


def test_edit_writes_all_outputs(tiny_checkpoint, tmp_path):
    out = tmp_path / "edit"
    args = ["edit", "a smiling woman", "--edit", "glasses:4", "--edit", "red hat:-2", "--lambda-coarse", "0.3", "--start", "1"]
    assert main([*args, "--model", str(tiny_checkpoint.transformer), "--out-dir", str(out), *SMALL]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["edited.png", "mask-glasses.png", "mask-red-hat.png", "original.png", "side_by_side.png"]
    params = read_png_params(out / "edited.png")
    assert params["edit"]["concepts"][1] == {"prompt": "red hat", "lambda_fine": -2.0, "tau_m": 0.5, "mask_words": None}
    assert params["edit"]["start"] == 1 and params["edit"]["lambda_coarse"] == 0.3
    assert not np.array_equal(pixels(out / "original.png"), pixels(out / "edited.png"))
    # The unedited image is the plain generation from the same seed.
    gen = tmp_path / "plain.png"
    main(["generate", "a smiling woman", "--model", str(tiny_checkpoint.transformer), "--out", str(gen), *SMALL])
    assert np.array_equal(pixels(gen), pixels(out / "original.png"))


def test_edit_from_toml(tiny_checkpoint, tmp_path):
    toml = tmp_path / "edits.toml"
    toml.write_text('lambda_coarse = 0.5\nstart = 1\n[[concept]]\nprompt = "glasses"\nlambda_fine = 3\ntau_m = 0.0\n')
    out = tmp_path / "edit"
    main(["edit", "a man", "--edits-file", str(toml), "--model", str(tiny_checkpoint.transformer), "--out-dir", str(out), *SMALL])
    params = read_png_params(out / "edited.png")
    assert params["edit"]["concepts"][0]["lambda_fine"] == 3 and params["edit"]["lambda_coarse"] == 0.5


def test_sweep_grid(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep.png"
    main(["sweep", "a woman", "--edit", "glasses", "--vary", "lambda_fine=0,3", "--vary", "tau_m=0,0.5",
          "--model", str(tiny_checkpoint.transformer), "--out", str(out), *SMALL])  # fmt: skip
    grid = Image.open(out)
    assert grid.size == (3 * 64 + 2 * 4, 2 * (48 + 14) + 4)
    assert read_png_params(out)["vary"] == {"lambda_fine": [0.0, 3.0], "tau_m": [0.0, 0.5]}


def test_sharded_sweep_equals_single_process(tiny_checkpoint, tmp_path):
    # Two processes under torchrun (gloo): each edits half the cells, rank 0 assembles the same grid.
    import os
    import subprocess
    import sys

    args = ["sweep", "a woman", "--edit", "glasses", "--vary", "lambda_fine=0,3,6", "--model",
            str(tiny_checkpoint.transformer), *SMALL]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "fluxspace.cli"]
    subprocess.run([sys.executable, *cli, *args, "--out", str(tmp_path / "one.png")], env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cli,
                    *args, "--out", str(tmp_path / "two.png")], env=env, check=True, capture_output=True)  # fmt: skip
    one, two = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "two.png")
    assert one.tobytes() == two.tobytes()
    assert sorted(p.name for p in (tmp_path / "two.png.shards").iterdir()) == ["cell-0-0.png", "cell-0-1.png", "cell-0-2.png"]
    assert not (tmp_path / "one.png.shards").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "x", "--width", "100"], "width 100 is not a multiple of 16; nearest valid: 96 or 112"),
        (["generate", "x", "--steps", "0"], "steps must be an integer >= 1; got 0"),
        (["generate", "x", "--out", "x.jpg"], "--out must be a .png path"),
        (["generate", "x", "--seed", "1", "2", "--batch", "3"], "--batch 3 needs 1 or 3 seeds; got 2"),
        (["edit", "x"], r"give at least one --edit WORD\[:LAMBDA\]"),
        (["edit", "x", "--edit", "hat:big"], "the part after ':' must be a number"),
        (["edit", "x", "--edit", "hat", "--tau", "2"], r"tau_m must be in \[0, 1\]; got 2.0"),
        (["edit", "x", "--edit", "hat", "--start", "5", "--end", "2", "--steps", "8"], r"start \(5\) is not before end \(2\)"),
        (["edit", "x", "--edit", "hat", "--start", "7", "--steps", "3"], "start step 7 is past the last step: 3 steps run as steps 0..2"),
        (["edit", "x", "--edit", "hat", "--blocks", "0-3"], r"double block indices \[1, 2, 3\] out of range; this model has double blocks 0..0"),
        (["sweep", "x", "--edit", "hat", "--vary", "gamma=1,2"], "cannot sweep 'gamma'; valid: lambda_fine, lambda_coarse, tau_m, start"),
    ],
)
def test_bad_arguments_are_refused_before_any_output(tiny_checkpoint, tmp_path, capsys, args, message):
    out_args = ["--out-dir", str(tmp_path / "o")] if args[0] == "edit" else ["--out", str(tmp_path / "o.png")]
    if args[0] == "generate" and "--out" in args:
        out_args = []
    with pytest.raises(SystemExit) as e:
        main([*args, "--model", str(tiny_checkpoint.transformer), *out_args])
    assert e.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.png").exists()


def test_missing_model_parts_are_named(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint.text_encoders, folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", str(folder), "--out", str(tmp_path / "o.png")])
    assert "missing tokenizer_2/" in capsys.readouterr().err
    (folder / "ae.safetensors").unlink()
    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", str(folder), "--out", str(tmp_path / "o.png")])
    assert "autoencoder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "x", "--preset", "flux-pro"])
    assert "invalid choice: 'flux-pro'" in capsys.readouterr().err


def test_atomic_file_leaves_the_target_untouched_when_writing_fails(tmp_path):
    target = tmp_path / "table.md"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(target, "w") as f:
        f.write("half a tab")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.md"]  # no temp left
    with atomic_file(target, "w") as f:
        f.write("new")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o666 & ~umask
