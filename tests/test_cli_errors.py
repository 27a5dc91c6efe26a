"""Hostile input to the fluxspace command: every bad input refused before any work, in one line, with
nothing written; a command's images appear all together or not at all, also under SIGTERM.

Table-driven: (arguments, files to create first, expected message). `{tmp}` in an argument is the
test's temporary folder; `{model}` the tiny checkpoint.
"""

import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxspace.cli import main
from fluxspace.images import read_png_params

SMALL = ["--width", "64", "--height", "48", "--steps", "3", "--quiet"]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixels are a few zero bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"whole-{os.getpid()}.png"
    Image.new("RGB", (64, 48), "red").save(path)
    data = path.read_bytes()
    path.unlink()
    return data[: len(data) // 2]


EDIT = ["edit", "a man", "--edit", "hat"]
CASES = [
    # arguments
    (["generate", "x", "--device", "banana"], {}, r"--device 'banana' is not a device; valid: cpu, cuda, cuda:N, mps"),
    (["generate", "x", "--dtype", "float16"], {}, r"invalid choice: 'float16' \(choose from '?float32'?, '?bfloat16'?\)"),
    (["generate", "x", "--seed", str(2**64)], {}, r"--seed 18446744073709551616 is out of range: seeds are integers in \[0, 2\^64 - 1"),
    (["generate", "x", "--seed", "-1"], {}, r"--seed -1 is out of range"),
    ([*EDIT, "--blocks", "3-1"], {}, r"--blocks: the range '3-1' runs backwards; write it as 1-3"),
    ([*EDIT, "--blocks", "0-999999999999"], {}, r"--blocks: block 999999999999 is out of range"),
    (["edit", "a man", "--edit", "hat:5:3"], {}, r"--edit 'hat:5:3' has more than one ':'"),
    (["edit", "a man", "--edits-file", "{tmp}/e.toml"], {"e.toml": b"blocks = 1\n[[concept]]\nprompt = 'hat'\n"},
     r"--edits-file .*e.toml: blocks must be a list of block indices or a range string like \"0-9\"; got 1"),
    (["edit", "a man", "--edits-file", "{tmp}/e.toml"], {"e.toml": b"concept = 5\n"}, r"'concept' must be \[\[concept\]\] tables"),
    (["edit", "a man", "--edits-file", "{tmp}/e.toml"], {"e.toml": b"[[concept]]\nprompt = 5\n"},
     r"\[\[concept\]\] 0 prompt must be a string; got 5"),
    (["edit", "a man", "--edits-file", "{tmp}/e.toml"], {"e.toml": b"[[concept]]\nprompt = 'hat'\nmask_words = 'hat'\n"},
     r"\[\[concept\]\] 0 mask_words must be a list of strings; got 'hat'"),
    (["edit", "a man", "--edits-file", "{tmp}/e.toml"], {"e.toml": b"[[concept]]\nprompt = '\xe9t\xe9'\n"},
     r"--edits-file .*e.toml is not UTF-8 text \(byte 0xe9 at offset 22\); TOML files are UTF-8"),
    ([*EDIT, "--image", "{tmp}/t.png"], {"t.png": truncated_png()}, r"cannot read image .*t.png: image file is truncated"),
    # resources
    (["generate", "x", "--height", "100000", "--width", "64"], {}, r"this run needs about \d+\.\d GiB .*: 64x100000 px, batch 1\) but cpu has"),
    (["generate", "x", "--height", "100000", "--width", "100000"], {}, r"at most 4096 x 4096 = 16,777,216 are sampled"),
    (["generate", "x", "--steps", "1000000000"], {}, r"steps must be at most 10,000; got 1,000,000,000"),
    (["generate", "x", "--width", "4096", "--height", "4096", "--batch", "200000"], {}, r"this run needs about .* GiB .* available"),
    ([*EDIT, "--image", "{tmp}/bomb.png"], {"bomb.png": png_header(100_000, 100_000)},
     r"image .*bomb.png: 10000000000 pixels in its header; at most 64,000,000 are read"),
    ([*EDIT, "--image", "{tmp}/big.png"], {"big.png": png_header(10_000, 10_000)},
     r"image .*big.png is 10000x10000 px \(100,000,000 pixels\); at most 64,000,000"),
    ([*EDIT, "--image", "{tmp}/big.png", "--size", "100000"], {"big.png": png_header(64, 48)},
     r"--size must be in \[1, 4096\] \(pixels of the longer side\); got 100000"),
    # outputs
    ([*EDIT, "--out-dir", "/sys/fluxspace-test"], {}, r"cannot write /sys/fluxspace-test/original.png: .* in /sys"),
    ([*EDIT, "--out-dir", "{tmp}/file/below"], {"file": b"x"}, r"cannot write .*: .*file is a file, not a folder"),
    ([*EDIT, "--out-dir", "/proc/fluxspace-test"], {}, r"cannot write /proc/fluxspace-test/original.png: .* in /proc"),
    ([*EDIT, "--out-dir", "{tmp}/o"], {"o/edited.png/x": b""}, r"cannot write .*o/edited.png: a folder of that name is in the way"),
    (["generate", "x", "--seed", "1", "2", "3", "--out", "{tmp}/g.png"], {"g-0.png/x": b""}, r"g-0.png: a folder of that name is in the way"),
]


@pytest.mark.parametrize("args, files, message", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_refused_in_one_line_before_any_work(tiny_checkpoint, tmp_path, capsys, args, files, message):
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    before = sorted(tmp_path.rglob("*"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if {"--out", "--out-dir"} & set(args) else (["--out-dir", str(tmp_path / "o")] if args[0] == "edit" else
                                                          ["--out", str(tmp_path / "o.png")])  # fmt: skip
    quick = ["--quiet"] + ([] if "--steps" in args else ["--steps", "3"])
    with pytest.raises(SystemExit) as e:
        main([*args, "--model", str(tiny_checkpoint.transformer), *out, *quick])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "loaded" not in err  # refused before the model was loaded
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_no_cuda_is_said_before_loading(tiny_checkpoint, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["generate", "x", "--device", "cuda", "--model", str(tiny_checkpoint.transformer), "--out", str(tmp_path / "o.png")])
    assert "this machine has no CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_debug_shows_the_traceback(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--steps", "0", "--debug", "--model", str(tiny_checkpoint.transformer)])
    assert "Traceback" in capsys.readouterr().err


def test_every_png_records_the_same_complete_metadata(tiny_checkpoint, tmp_path):
    model = ["--model", str(tiny_checkpoint.transformer), *SMALL]
    main(["generate", "a man", "--out", str(tmp_path / "g.png"), *model])
    main(["edit", "a man", "--edit", "hat", "--out-dir", str(tmp_path / "e"), *model])
    main(["sweep", "a man", "--edit", "hat", "--vary", "lambda_fine=0,2", "--out", str(tmp_path / "s.png"), *model])
    Image.new("RGB", (64, 48), "red").save(tmp_path / "photo.png")
    main(["invert", str(tmp_path / "photo.png"), "--out", str(tmp_path / "i.png"), *model])
    common = {"command", "prompt", "seed", "width", "height", "steps", "guidance", "cfg_scale", "negative_prompt",
              "parity", "preset", "model", "dtype", "weights_format", "device", "offload", "text_device", "staged", "compile",
              "version", "weights"}  # fmt: skip
    for png in [tmp_path / "g.png", *(tmp_path / "e").glob("*.png"), tmp_path / "s.png", tmp_path / "i.png"]:
        params = read_png_params(png)
        assert common <= set(params), (png.name, common - set(params))
        assert params["dtype"] == "float32" and params["device"] == "cpu" and params["weights_format"] == "full"
        parts = {w["part"] for w in params["weights"]}
        assert parts == {"transformer", "ae", "text_encoder", "text_encoder_2"}
        assert all(len(w["header_sha256"]) == 64 and w["bytes"] > 0 for w in params["weights"])


def test_sigterm_leaves_the_whole_set_or_nothing(tiny_checkpoint, tmp_path):
    """SIGTERM at moments spread over a three-image generate: all three PNGs or none, no temporary file."""
    cmd = [sys.executable, "-m", "fluxspace.cli", "generate", "x", "--seed", "1", "2", "3", "--width", "64",
           "--height", "48", "--steps", "40", "--quiet", "--model", str(tiny_checkpoint.transformer)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def started(out: Path) -> subprocess.Popen:
        """The command, once its model is loaded (the "loaded" line): from then on it is sampling and saving."""
        proc = subprocess.Popen([*cmd, "--out", str(out / "g.png")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while b"loaded" not in proc.stderr.readline():
            assert proc.poll() is None, "the command ended before loading its model"
        return proc

    proc = started(tmp_path / "full")
    t0 = time.perf_counter()
    proc.communicate(timeout=120)
    work = time.perf_counter() - t0  # sampling and saving, timed from the "loaded" line
    outcomes = set()
    # Kills timed from the start of the work, past its end too: so the timing of a busy machine cannot
    # make every kill land before the command starts or after it ends.
    for k, fraction in enumerate((0.0, 0.3, 0.6, 0.9, 0.95, 1.0, 1.1)):
        out = tmp_path / f"run{k}"
        proc = started(out)
        time.sleep(work * fraction)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=120)
        err = b"loaded" + rest
        names = sorted(p.name for p in out.glob("*")) if out.exists() else []
        hidden = [p for p in out.rglob(".*")] if out.exists() else []
        assert not hidden, hidden
        assert names in ([], ["g-0.png", "g-1.png", "g-2.png"]), names
        assert b"Traceback" not in err
        if not names:  # stopped part-way: said so, exit status 128 + 15
            assert proc.returncode == 143 and b"stopped by SIGTERM" in err, (proc.returncode, err)
        else:  # finished; a SIGTERM while the interpreter shuts down still ends it by the signal (-15)
            assert proc.returncode in (0, 143, -signal.SIGTERM), (proc.returncode, err)
        outcomes.add((proc.returncode, len(names)))
    assert (143, 0) in outcomes  # at least one run was stopped part-way


def test_a_broken_checkpoint_is_one_line_before_loading(tiny_checkpoint, tmp_path, capsys):
    """A transformer file missing one tensor, and one whose header lies about a dtype: the CLI says so
    in one line, naming the file, before loading anything (the loader's checks: tests/test_checkpoint_errors.py)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint.transformer.parent, folder)
    transformer = folder / tiny_checkpoint.transformer.name
    state = load_file(transformer)
    del state["final_layer.linear.weight"]
    save_file(state, transformer)
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--model", str(transformer), "--out", str(tmp_path / "o.png"), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(transformer) in err and "final_layer.linear.weight" in err, err
    assert not (tmp_path / "o.png").exists()
