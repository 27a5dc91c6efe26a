"""What the `flux-weights` tests share (tests/test_weights_tools.py on FLUX.1, tests/test_flux2_weights_tools.py
on FLUX.2): the CLI driven through main([...]), and the random checkpoint set they read."""

from pathlib import Path

from weights_tools.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """`flux-weights *argv` (paths and numbers as strings): (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def random_set(folder: Path, preset: str) -> Path:
    """A full random float32 set of `preset` (transformer, AE, text encoders) written into `folder`, seed 3."""
    assert main(["random", "--preset", preset, "--out", str(folder), "--dtype", "float32", "--seed", "3"]) == 0
    return folder
