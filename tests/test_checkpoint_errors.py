"""Broken weight files: each is refused with one CheckpointError line naming the file, what is wrong
and what is valid, before any tensor is read; `flux-weights` verify / inspect / convert refuse what
the loader refuses (exit 2, the same line, no traceback)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_core import CheckpointError, load_autoencoder, load_flow_model
from flux_core.files import open_weights, read_header
from flux_core.loading import read_ae_params, read_flux_params
from weights_tools.cli import main

# ----------------------------------------------------------------------------------------------
# Helpers: rewrite a file's header (the data unchanged) or its tensors


def split(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write(path, header: dict | str, body: bytes) -> None:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def first_two(header: dict) -> tuple[str, str]:
    """The keys of the first two tensors in the data section."""
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    return keys[0], keys[1]


def entry(key: str, **changes):
    """An edit setting fields of one entry."""

    def edit(header):
        header[key].update(changes)

    return edit


def overlap(header):
    a, b = first_two(header)
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0] + 4, header[a]["data_offsets"][0] + 4 + size]


def reverse(header):
    header["img_in.weight"]["data_offsets"].reverse()


def relabel_f32(header):
    header["img_in.weight"]["dtype"] = "F32"  # the bf16 file: the bytes are half what F32 needs


def metadata(key, value):
    def edit(header):
        header["__metadata__"][key] = value

    return edit


# (id, file: transformer | transformer_bf16 | ae, edit of the parsed header, or text, message fragment)
HEADER_CASES = [
    ("overlap", "transformer", overlap, r"overlaps that of '.*' \(up to \d+\); each tensor needs its own bytes"),
    ("reversed offsets", "transformer", reverse, r"data_offsets \[\d+, \d+\]: begin after end; expected begin <= end"),
    ("unknown dtype", "transformer", entry("img_in.weight", dtype="F33"), r"has dtype 'F33'; valid: F64, F32, F16, BF16"),
    ("dtype not a string", "ae", entry("encoder.conv_in.bias", dtype=32), r"has dtype 32; valid: F64"),
    ("BF16 relabelled F32", "transformer_bf16", relabel_f32, r"'img_in.weight' is F32 \(64, 64\), 16384 bytes, but its data_offsets \[\d+, \d+\] hold 8192 bytes"),
    ("negative shape", "transformer", entry("img_in.weight", shape=[-64, -64]), r"has shape \[-64, -64\]; expected a list of non-negative integers"),
    ("float shape", "transformer", entry("img_in.weight", shape=[64.0, 64]), r"has shape \[64.0, 64\]; expected a list of non-negative"),
    ("shape not a list", "ae", entry("encoder.conv_in.bias", shape="32"), r"has shape '32'; expected a list"),
    ("three offsets", "transformer", entry("img_in.weight", data_offsets=[0, 4, 8]), r"has data_offsets \[0, 4, 8\]; expected \[begin, end\], two non-negative integers"),
    ("offsets past the end", "transformer", entry("txt_in.weight", data_offsets=[10**12, 10**12 + 8192]), r"hold 8192 bytes|belong to no tensor|truncated"),
    ("no dtype", "transformer", lambda h: h["img_in.weight"].pop("dtype") and None, r"has no dtype; every tensor needs dtype, shape, data_offsets"),
    ("entry a list", "transformer", lambda h: h.update({"img_in.weight": [1]}), r"'img_in.weight' is a list; expected an object with dtype, shape, data_offsets"),
    ("__metadata__ a string", "transformer", lambda h: h.update({"__metadata__": "tiny"}), r"the header's __metadata__ is a string; expected an object of string -> string"),
    ("fluxspace.preset a list", "transformer", metadata("fluxspace.preset", ["tiny"]), r"__metadata__ 'fluxspace.preset' is a list \(\['tiny'\]\); expected a string"),
    ("metadata value a number", "ae", metadata("fluxspace.scale_factor", 0.3611), r"__metadata__ 'fluxspace.scale_factor' is a number \(0.3611\); expected a string"),
    ("header a list", "transformer", lambda h: "[]", r"corrupt safetensors header: a list, expected an object"),
    ("key twice", "transformer", lambda h: json.dumps(h)[:-1] + ', "img_in.bias": ' + json.dumps(h["img_in.bias"]) + "}", r"key 'img_in.bias' appears twice in one JSON object"),
    ("NaN", "transformer", lambda h: json.dumps(h).replace('"fluxspace.theta": "10000"', '"fluxspace.theta": NaN'), r"corrupt safetensors header: NaN is not JSON"),
    ("lone surrogate", "transformer", lambda h: json.dumps(h).replace('"img_in.bias"', '"\\ud800img_in.bias"'), r"lone surrogate"),
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    bf16 = folder / "flux1-tiny-bf16.safetensors"
    sd = load_file(tiny_checkpoint.transformer)
    save_file(
        {k: v.to(torch.bfloat16) for k, v in sd.items()},
        bf16,
        metadata=read_header(tiny_checkpoint.transformer)[2],
    )
    return {"transformer": tiny_checkpoint.transformer, "transformer_bf16": bf16, "ae": tiny_checkpoint.ae}


def broken(files, tmp_path, kind: str, edit) -> object:
    header, body = split(files[kind])
    new = edit(header)
    path = tmp_path / f"broken-{kind}.safetensors"
    write(path, header if new is None else new, body)
    return path


def refusals(path, kind: str) -> list:
    """What each reader makes of the file: a CheckpointError (or the value, if it loads)."""
    if kind.startswith("transformer"):
        calls = [
            lambda: load_flow_model(path),
            lambda: load_flow_model(path, preset="tiny"),
            lambda: read_flux_params(path),
        ]
    else:
        calls = [lambda: load_autoencoder(path), lambda: read_ae_params(path)]
    out = []
    for call in calls:
        with pytest.raises(CheckpointError) as e:
            call()
        out.append(str(e.value))
    return out


def assert_one_line_naming(message: str, path, fragment: str) -> None:
    assert str(path) in message, message
    assert "\n" not in message, message
    assert re.search(fragment, message), message


@pytest.mark.parametrize("name, kind, edit, fragment", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_bad_headers_are_refused_by_every_reader_and_tool(
    files, tmp_path, capsys, name, kind, edit, fragment
):
    path = broken(files, tmp_path, kind, edit)
    for message in refusals(path, kind):
        assert_one_line_naming(message, path, fragment)
    # The tools refuse the file as the loader does: exit 2, that one line, nothing written.
    message = refusals(path, kind)[0]
    out = tmp_path / "converted.safetensors"
    model = "ae" if kind == "ae" else "transformer"
    for argv in (
        ["inspect", path],
        ["verify", path, "--preset", "tiny", "--model", model],
        ["convert", path, out, "--to", "diffusers"],
    ):
        assert main([str(a) for a in argv]) == 2
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"error: {message}\n")
    assert not out.exists()


def test_trailing_bytes_and_gaps(files, tmp_path):
    header, body = split(files["transformer"])
    path = tmp_path / "trailing.safetensors"
    write(path, header, body + b"\0" * 8)
    with pytest.raises(
        CheckpointError,
        match=r"has 8 bytes after the last tensor's data .* safetensors needs the data to end the file",
    ):
        load_flow_model(path)
    # The first tensor moved 8 bytes on: a gap before it, and the last bytes overlap.
    a, _ = first_two(header)
    header[a]["data_offsets"] = [8, header[a]["data_offsets"][1] + 8]
    write(path, header, body)
    with pytest.raises(
        CheckpointError, match=r"the bytes \[0, 8\) at the start of the data belong to no tensor"
    ):
        load_flow_model(path)


# ----------------------------------------------------------------------------------------------
# Our metadata values: the key and the expected type named

METADATA_CASES = [
    ("transformer", "fluxspace.axes_dim", "[8, 12", r"metadata 'fluxspace.axes_dim' is '\[8, 12'; expected a JSON list of positive even integers"),
    ("transformer", "fluxspace.axes_dim", "[8, 8, 8, 8]", r"metadata 'fluxspace.axes_dim' \[8, 8, 8, 8\] has 4 axes; this model's position ids have 3$"),
    ("transformer", "fluxspace.axes_dim", "[8.0, 12, 12]", r"metadata 'fluxspace.axes_dim' is '\[8.0, 12, 12\]'; expected a JSON list"),
    ("transformer", "fluxspace.axes_dim", "[8, 8, 8]", r"metadata 'fluxspace.axes_dim' \[8, 8, 8\] sums to 24, but the tensors have head dim 32"),
    ("transformer", "fluxspace.theta", "ten thousand", r"metadata 'fluxspace.theta' is 'ten thousand'; expected a positive integer, e.g. 10000"),
    ("transformer", "fluxspace.theta", "1e4", r"metadata 'fluxspace.theta' is '1e4'; expected a positive integer"),
    ("ae", "fluxspace.scale_factor", "x", r"metadata 'fluxspace.scale_factor' is 'x'; expected a finite non-zero number, e.g. 0.3611"),
    ("ae", "fluxspace.shift_factor", "nan", r"metadata 'fluxspace.shift_factor' is 'nan'; expected a finite number"),
    ("ae", "fluxspace.resolution", "-1", r"metadata 'fluxspace.resolution' is '-1'; expected a positive integer"),
]  # fmt: skip


@pytest.mark.parametrize(
    "kind, key, value, fragment", METADATA_CASES, ids=[f"{c[1]}={c[2]}" for c in METADATA_CASES]
)
def test_bad_metadata_values_are_named(files, tmp_path, capsys, kind, key, value, fragment):
    path = broken(files, tmp_path, kind, metadata(key, value))
    load, read = (
        (load_flow_model, read_flux_params) if kind == "transformer" else (load_autoencoder, read_ae_params)
    )
    for call in (load, read):
        with pytest.raises(CheckpointError) as e:
            call(path)
        assert_one_line_naming(str(e.value), path, fragment)
    # verify (against a preset) checks the metadata as the loader does; inspect reports the refusal.
    model = "ae" if kind == "ae" else "transformer"
    # the axes' sum and count are checked against the tensors only when the shape is inferred
    if "sums to" not in fragment and "axes;" not in fragment:
        assert main(["verify", str(path), "--preset", "tiny", "--model", model]) == 2
        assert re.search(fragment, capsys.readouterr().err)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] is None and re.search(fragment, report["problem"])


# ----------------------------------------------------------------------------------------------
# Shape inference: missing tensors and contradictory shapes, never a KeyError


def rewrite_tensors(src, dst, edit):
    sd = load_file(src)
    edit(sd)
    save_file(sd, dst, metadata=read_header(src)[2])
    return dst


SHAPE_CASES = [
    ("transformer", lambda sd: sd.pop("final_layer.linear.weight"), r"cannot infer the Flux transformer's shape: 1 missing: final_layer.linear.weight", r"does not match tiny: 1 missing: final_layer.linear.weight"),
    ("transformer", lambda sd: sd.pop("img_in.weight"), r"1 missing: img_in.weight", r"1 missing: img_in.weight"),
    ("transformer", lambda sd: sd.pop("double_blocks.0.img_attn.norm.query_norm.scale"), r"1 missing: double_blocks.0.img_attn.norm.query_norm.scale", r"1 missing: double_blocks.0.img_attn.norm.query_norm.scale"),
    ("transformer", lambda sd: sd.update({"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(48)}), r"query_norm.scale \(48,\) gives a head dim of 48, which does not divide the hidden size 64 of img_in.weight \(64, 64\)", r"mis-shaped: double_blocks.0.img_attn.norm.query_norm.scale \(48,\) != \(32,\)"),
    ("transformer", lambda sd: sd.update({"txt_in.weight": sd["txt_in.weight"].reshape(32, 64)}), r"does not match its inferred shape: .*mis-shaped: txt_in.weight \(32, 64\) != \(64, 64\)", r"mis-shaped: txt_in.weight \(32, 64\) != \(64, 32\)"),
    ("transformer", lambda sd: sd.update({"img_in.weight": torch.zeros(0, 64)}), r"img_in.weight has shape \(0, 64\); expected \(hidden size, in channels\), each positive", r"mis-shaped: img_in.weight \(0, 64\) != \(64, 64\)"),
    ("ae", lambda sd: sd.pop("decoder.conv_in.weight"), r"cannot infer the autoencoder's shape: 1 missing: decoder.conv_in.weight", None),
    ("ae", lambda sd: sd.update({"encoder.conv_in.weight": sd["encoder.conv_in.weight"].reshape(16, 6, 3, 3)}), r"encoder.conv_in.weight has 16 output channels; the autoencoder's GroupNorm needs a multiple of 32", None),
    ("ae", lambda sd: sd.update({"encoder.down.1.block.0.conv2.weight": torch.zeros(48, 32, 3, 3)}), r"encoder.down.1.block.0.conv2.weight has 48 output channels, not a multiple of the 32 channels of encoder.conv_in.weight", None),
]  # fmt: skip


@pytest.mark.parametrize("kind, edit, without_preset, with_preset", SHAPE_CASES)
def test_shape_inference_names_missing_and_contradictory_tensors(
    files, tmp_path, kind, edit, without_preset, with_preset
):
    path = rewrite_tensors(files[kind], tmp_path / f"{kind}.safetensors", edit)
    load = load_flow_model if kind == "transformer" else load_autoencoder
    with pytest.raises(CheckpointError) as e:
        load(path)
    assert_one_line_naming(str(e.value), path, without_preset)
    assert "RoPE" not in str(e.value)
    if with_preset is not None:
        with pytest.raises(CheckpointError) as e:
            load_flow_model(path, preset="tiny")
        assert_one_line_naming(str(e.value), path, with_preset)
        assert main(["verify", str(path), "--preset", "tiny"]) == 1  # a mismatch, listed


# ----------------------------------------------------------------------------------------------
# Sharded folders: the index json


@pytest.mark.parametrize(
    "index, fragment",
    [
        ("{not json", r"is not a valid safetensors index: Expecting property name"),
        ("[]", r"is not a valid safetensors index: a list; expected an object with a \"weight_map\""),
        ('{"weight_map": ["a.safetensors"]}', r"weight_map is a list; expected an object"),
        ('{"metadata": {}}', r"no weight_map; expected"),
        (
            '{"weight_map": {"img_in.weight": 3}}',
            r"weight_map\['img_in.weight'\] is 3; expected the name of a shard file in",
        ),
        (
            '{"weight_map": {"img_in.weight": "../flux1-tiny.safetensors"}}',
            r"is '../flux1-tiny.safetensors'; expected the name of a shard file",
        ),
        (
            '{"weight_map": {"img_in.weight": "absent.safetensors"}}',
            r"no such weight file: .*absent.safetensors",
        ),
    ],
)
def test_bad_index_json(tmp_path, index, fragment):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError) as e:
        open_weights(folder)
    assert_one_line_naming(str(e.value), folder, fragment)
    with pytest.raises(CheckpointError, match=fragment):
        load_flow_model(tmp_path, preset="tiny")
