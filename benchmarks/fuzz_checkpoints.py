"""Fuzz the checkpoint loader: mutated headers of a tiny random checkpoint must be loaded or refused
with a CheckpointError, never anything else, and `flux-weights verify` / `inspect` must agree.

    python benchmarks/fuzz_checkpoints.py --n 20000 --seed 0

The two files of the `tiny` preset and the two of `tiny-flux2` (transformers in bf16, autoencoders
in float32, with our metadata) are written once; each mutant is one of them with 1 to 3 mutations (`mutate`, also used by
tests/test_checkpoint_fuzz.py), at four levels, applied in this order:

1. tensors: the file stays a valid safetensors file (a tensor dropped, renamed, duplicated, added,
   reshaped to the same element count, given another dtype of the same size or a matching shape;
   a metadata value deleted or replaced by a string of the wrong kind) - the loader's own checks;
2. header JSON: a dtype, shape, data_offsets or entry replaced by a value of the wrong type or
   range (F33, a BF16 tensor relabelled F32, negative dims, reversed or overlapping offsets ...),
   a field dropped, __metadata__ or the whole header of the wrong type;
3. header text: a key twice, NaN, a lone surrogate, deep nesting, a character inserted, deleted or
   replaced, padding, trailing text, another encoding;
4. bytes: the length field changed, the file truncated, bytes appended or flipped, random bytes.

Each mutant is then read as the tools read it (`check` below): read_flux_params / read_ae_params (FLUX.2:
read_flux2_params / check_flux2_autoencoder), load without and with the preset, `verify --preset tiny`
(tiny-flux2), `inspect`. Outcomes: loaded OK,
CheckpointError, or the type of any other exception (with an example: mutations, message,
traceback). Disagreements are counted too: verify OK but the load with the preset fails (or the
reverse); inspect's params present but the load without a preset fails (or the reverse); a
CheckpointError message that does not name the file or spans several lines. Goal: all zero.

Prints a markdown table and writes JSON (settings, machine, every count, examples) atomically to
benchmarks/results/fuzz_checkpoints.json. One thread: the loads are of a 0.3M-parameter model.
"""

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import machine_info, write_json  # noqa: E402  (the shared harness)
from safetensors import safe_open  # noqa: E402

from flux_core.autoencoder import AutoEncoder  # noqa: E402
from flux_core.files import SAFETENSORS_DTYPES, CheckpointError, open_weights, read_header  # noqa: E402
from flux_core.flux2.autoencoder import AutoEncoder as Flux2AutoEncoder  # noqa: E402
from flux_core.flux2.loading import (  # noqa: E402
    check_flux2_autoencoder,
    load_flux2_autoencoder,
    load_flux2_model,
    read_flux2_params,
)
from flux_core.flux2.model import Flux2  # noqa: E402
from flux_core.formats import BFL_PREFIX  # noqa: E402
from flux_core.inference import (  # noqa: E402
    META_AXES_DIM,
    META_PRESET,
    META_RESOLUTION,
    META_SCALE_FACTOR,
    META_SHIFT_FACTOR,
    META_THETA,
    ae_metadata,
    flux_metadata,
)
from flux_core.loading import (  # noqa: E402
    load_autoencoder,
    load_flow_model,
    read_ae_params,
    read_flux_params,
)
from flux_core.model import Flux  # noqa: E402
from flux_core.presets import get_preset  # noqa: E402
from weights_tools.inspect import inspect_path  # noqa: E402
from weights_tools.random_weights import integer_dtypes, meta_shapes, write_random_file  # noqa: E402
from weights_tools.verify import verify_file  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRESET = "tiny"
KINDS = ("transformer", "ae", "flux2-transformer", "flux2-ae")
FLUX2_PRESET = "tiny-flux2"


# ----------------------------------------------------------------------------------------------
# The files mutated


def write_base_files(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The tiny and tiny-flux2 presets' transformers (bf16) and autoencoders (float32), as `flux-weights
    random` writes them."""
    p, p2 = get_preset(PRESET), get_preset(FLUX2_PRESET)
    with torch.device("meta"):
        flux_shapes, ae_shapes = meta_shapes(Flux(p.params)), meta_shapes(AutoEncoder(p.ae_params))
        flux2, ae2 = Flux2(p2.params), Flux2AutoEncoder(p2.ae_params)
    flux2_meta, ae2_meta = flux_metadata(p2.params, preset=p2.name), {META_RESOLUTION: str(p2.ae_params.resolution)}
    return {
        "transformer": write_random_file(folder / "flux1-tiny.safetensors", flux_shapes, seed, torch.bfloat16,
                                         flux_metadata(p.params, preset=p.name), force=True),
        "ae": write_random_file(folder / "ae.safetensors", ae_shapes, seed, torch.float32, ae_metadata(p.ae_params), force=True),
        "flux2-transformer": write_random_file(folder / "flux2-tiny.safetensors", meta_shapes(flux2), seed, torch.bfloat16,
                                               flux2_meta, force=True),
        "flux2-ae": write_random_file(folder / "flux2-ae.safetensors", meta_shapes(ae2), seed, torch.float32, ae2_meta,
                                      force=True, integers=integer_dtypes(ae2)),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The mutator: mutate(data, rng) -> (mutant bytes, names of the mutations applied)

# Stage 1 works on this: the metadata (or None) and the tensors in file order, each
# {"name", "dtype", "shape", "data"}; it is written back as a valid safetensors file.


def parse(data: bytes) -> tuple[dict | None, list[dict]]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    metadata = header.pop("__metadata__", None)
    tensors = [
        {"name": k, "dtype": v["dtype"], "shape": list(v["shape"]), "data": body[v["data_offsets"][0] : v["data_offsets"][1]]}
        for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    ]  # fmt: skip
    return metadata, tensors


def layout(metadata: dict | None, tensors: list[dict]) -> tuple[list[list], bytes]:
    """Header pairs [[key, value], ...] (a list, so that a key can be written twice) and the data."""
    pairs, offset = [], 0
    if metadata is not None:
        pairs.append(["__metadata__", metadata])
    for t in tensors:
        pairs.append(
            [
                t["name"],
                {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [offset, offset + len(t["data"])]},
            ]
        )
        offset += len(t["data"])
    return pairs, b"".join(t["data"] for t in tensors)


class NotAnObject:
    """Stage 2's replacement of the whole header by another JSON value (a list, a string ...)."""

    def __init__(self, value):
        self.value = value


def header_text(pairs) -> str:
    if isinstance(pairs, NotAnObject):
        return json.dumps(pairs.value)
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


def assemble(text: str | bytes, body: bytes, pad: bool = True) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    if pad:
        raw += b" " * (-len(raw) % 8)  # as safetensors writes it: the data 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw + body


ITEMSIZE = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}
OUR_META = (META_PRESET, META_AXES_DIM, META_THETA, META_SCALE_FACTOR, META_SHIFT_FACTOR, META_RESOLUTION)
META_VALUES = (
    "", "abc", "-1", "0", "1", "7", "10000", "1e4", "10000.0", " 10000 ", "1_000", "0x10", "nan", "inf",
    "-inf", "NaN", "0.0", "-0.5", "0.3611", "[8, 12, 12]", "[8,12]", "[8, 12, 13]", "[16, 56, 56]",
    "[0, 16, 16]", "[-8, 20, 20]", "[8.0, 12, 12]", "[true, 12, 12]", "[[8], [12], [12]]", "[8, 12, 12, 0]",
    "[10, 10, 12]", '{"a": 1}', "null", "[NaN, 12, 12]", "tiny", "flux-dev", "flux-schnell", "no-such-preset",
    "\u0661\u0660", "x" * 5000, "[" * 3000 + "]" * 3000,
)  # fmt: skip
NAMES = (
    "img_in.weight", "double_blocks.3.img_mod.lin.weight", "single_blocks.9.linear1.weight",
    "transformer_blocks.0.attn.to_q.weight", "encoder.down.7.block.0.conv1.weight",
    "decoder.up_blocks.0.resnets.0.conv1.weight", "guidance_in.in_layer.weight", "__metadata__", "",
    "bad\nkey", "x" * 300, "encoder.down_blocks.0.resnets.0.conv1.weight",
)  # fmt: skip


def _rename(rng: random.Random, name: str) -> str:
    choice = rng.randrange(5)
    if choice == 0 and re.search(r"\d+", name):  # another block index
        return re.sub(r"\d+", lambda m: str(rng.randrange(6)), name, count=1)
    if choice == 1:
        return BFL_PREFIX + name
    if choice == 2:
        return rng.choice(NAMES)
    if choice == 3 and name:
        i = rng.randrange(len(name))
        return name[:i] + rng.choice("._0a9Z ") + name[i + 1 :]
    return name + rng.choice((".weight", ".bias", "_", ".0"))


def _same_numel_shape(rng: random.Random, shape: list[int]) -> list[int]:
    numel = math.prod(shape)
    choice = rng.randrange(4)
    if choice == 0:
        return rng.sample(shape, len(shape))  # permuted
    if choice == 1:
        return [numel]
    if choice == 2:
        return shape + [1] if rng.random() < 0.5 else [1] + shape
    divisors = [d for d in range(2, min(numel, 64) + 1) if numel % d == 0]
    return [numel // d, d] if divisors and (d := rng.choice(divisors)) else [numel]


def mutate_tensors(rng: random.Random, metadata: dict | None, tensors: list[dict]) -> tuple[dict | None, str]:
    """One stage-1 mutation in place (the file stays valid safetensors); returns (metadata, its name)."""
    op = rng.choice(("drop", "rename", "duplicate", "add", "reshape", "retype", "retype_reshape", "empty",
                     "meta_delete", "meta_set", "meta_set", "meta_add", "meta_none"))  # fmt: skip
    i = rng.randrange(len(tensors)) if tensors else None
    if op == "drop" and tensors:
        del tensors[i]
    elif op == "rename" and tensors:
        tensors[i]["name"] = _rename(rng, tensors[i]["name"])  # may name another tensor, or __metadata__
    elif op == "duplicate" and tensors:
        tensors.append({**tensors[i], "name": _rename(rng, tensors[i]["name"])})
    elif op == "add":
        shape = [rng.randrange(1, 5) for _ in range(rng.randrange(1, 3))]
        dtype = rng.choice(list(ITEMSIZE))
        data = bytes(math.prod(shape) * ITEMSIZE[dtype])
        tensors.insert(
            rng.randrange(len(tensors) + 1),
            {"name": rng.choice(NAMES), "dtype": dtype, "shape": shape, "data": data},
        )
    elif op == "reshape" and tensors:
        tensors[i]["shape"] = _same_numel_shape(rng, tensors[i]["shape"])
    elif op == "retype" and tensors:
        size = ITEMSIZE[tensors[i]["dtype"]]
        tensors[i]["dtype"] = rng.choice([d for d, s in ITEMSIZE.items() if s == size])
    elif op == "retype_reshape" and tensors:  # another size, the last dim scaled so that the bytes match
        t, new = tensors[i], rng.choice(list(ITEMSIZE))
        numel, lead = divmod(len(t["data"]), ITEMSIZE[new])[0], t["shape"][:-1]
        if len(t["data"]) % ITEMSIZE[new] == 0:
            rows = math.prod(lead)
            t["dtype"], t["shape"] = new, lead + [numel // rows] if rows and numel % rows == 0 else [numel]
    elif op == "empty" and tensors:
        tensors[i]["shape"] = [0] + tensors[i]["shape"][1:]
        tensors[i]["data"] = b""
    elif op == "meta_delete" and metadata:
        del metadata[rng.choice(sorted(metadata))]
    elif op in ("meta_set", "meta_add"):
        metadata = {} if metadata is None else metadata
        key = rng.choice(OUR_META) if op == "meta_set" else rng.choice(("format", "x", "fluxspace.other", ""))
        metadata[key] = rng.choice(META_VALUES)
    elif op == "meta_none":
        metadata = None
    return metadata, op


def _bad_value(rng: random.Random):
    return rng.choice((None, True, -1, 1.5, "x", "", [], {}, [None], [[1]], 2**64, -(2**63), float("inf")))


def mutate_header(rng: random.Random, pairs: list[list]) -> tuple[object, str]:
    """One stage-2 mutation of the header's JSON values (the data is not touched)."""
    entries = [p for p in pairs if p[0] != "__metadata__" and isinstance(p[1], dict)]
    op = rng.choice(("dtype", "dtype_relabel", "shape", "offsets", "offsets_swap", "offsets_overlap", "entry",
                     "field_drop", "field_add", "metadata", "header"))  # fmt: skip
    if op == "header":
        return NotAnObject(rng.choice(([], "header", 1, None, [pairs[0][0]] if pairs else []))), op
    if op == "metadata":
        meta = rng.choice(
            ("a string", ["list"], 3, {"k": 1}, {"k": None}, {"k": ["x"]}, {"k": {"a": "b"}}, {})
        )
        found = [p for p in pairs if p[0] == "__metadata__"]
        if found:
            found[0][1] = meta
        else:
            pairs.insert(0, ["__metadata__", meta])
        return pairs, op
    if not entries:
        return pairs, op
    entry = rng.choice(entries)[1]
    if op == "dtype":
        entry["dtype"] = rng.choice(("F33", "f32", "", "FP32", "float32", "U16", "C64", 32, None, ["F32"])) if rng.random() < 0.6 else _bad_value(rng)  # fmt: skip
    elif op == "dtype_relabel":  # e.g. a BF16 tensor relabelled F32: the byte count no longer agrees
        entry["dtype"] = rng.choice([d for d in ITEMSIZE if d != entry.get("dtype")])
    elif op == "shape":
        shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else [1]
        choice = rng.randrange(6)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] *= -1
        elif choice == 1 and shape:
            shape[rng.randrange(len(shape))] = _bad_value(rng)
        elif choice == 2:
            shape.append(rng.choice((1, 2, 0)))
        elif choice == 3:
            shape = shape[1:]
        elif choice == 4 and shape:
            shape[rng.randrange(len(shape))] += rng.choice((-1, 1, 2**62, 2**64))
        else:
            shape = _bad_value(rng)
        entry["shape"] = shape
    elif op == "offsets":
        offsets = list(entry["data_offsets"]) if isinstance(entry.get("data_offsets"), list) else [0, 0]
        choice = rng.randrange(6)
        if choice == 0 and len(offsets) == 2:
            offsets.reverse()
        elif choice == 1 and offsets:
            offsets[rng.randrange(len(offsets))] += rng.choice((-1, 1, -8, 8, 2**40))
        elif choice == 2:
            offsets = offsets[:1]
        elif choice == 3:
            offsets = offsets + [offsets[-1] if offsets else 0]
        elif choice == 4 and offsets:
            offsets[rng.randrange(len(offsets))] = _bad_value(rng)
        else:
            offsets = _bad_value(rng)
        entry["data_offsets"] = offsets
    elif op == "offsets_swap" and len(entries) > 1:
        other = rng.choice(entries)[1]
        entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
    elif op == "offsets_overlap" and len(entries) > 1:  # move onto another tensor's bytes
        other = rng.choice(entries)[1]
        try:
            begin = other["data_offsets"][0] + rng.randrange(4)
            entry["data_offsets"] = [begin, begin + entry["data_offsets"][1] - entry["data_offsets"][0]]
        except (KeyError, TypeError, IndexError):
            pass
    elif op == "entry":
        key = next(p for p in pairs if p[1] is entry)
        key[1] = _bad_value(rng) if rng.random() < 0.7 else [entry]
    elif op == "field_drop":
        entry.pop(rng.choice(("dtype", "shape", "data_offsets")), None)
    elif op == "field_add":
        entry[rng.choice(("extra", "Dtype", "\ud800"))] = rng.choice(("\ud800", 1, None, [1, 2]))
    return pairs, op


def mutate_text(rng: random.Random, text: str) -> tuple[str | bytes, str, bool]:
    """One stage-3 mutation of the header's text: (text or raw bytes, name, whether to pad it)."""
    op = rng.choice(("dup_key", "dup_field", "nan", "surrogate", "nest", "insert", "delete", "replace",
                     "unpadded", "leading_space", "trailing", "utf16", "bom", "bad_utf8"))  # fmt: skip
    pad = True
    if op == "dup_key" and text.startswith("{") and len(text) > 2:
        m = re.search(r'"[^"]*":\{[^{}]*\}', text[rng.randrange(len(text)) :]) or re.search(
            r'"[^"]*":\{[^{}]*\}', text
        )
        if m:
            text = text[:-1] + "," + m.group(0) + "}"
    elif op == "dup_field":
        text = text.replace('"dtype":', '"dtype":"F32","dtype":', 1)
    elif op == "nan":
        numbers = list(re.finditer(r"(?<![\w.])\d+(?![\w.])", text))
        if numbers:
            m = rng.choice(numbers)
            text = (
                text[: m.start()]
                + rng.choice(("NaN", "Infinity", "-Infinity", "1e999", "1.0", "-0"))
                + text[m.end() :]
            )
    elif op == "surrogate":
        keys = list(re.finditer(r'"[^"\\]+"', text))
        if keys:
            m = rng.choice(keys)
            text = text[: m.start() + 1] + "\\ud800" + text[m.start() + 2 :]
    elif op == "nest":
        text = text[:-1] + ',"deep":' + "[" * 100_000 + "]" * 100_000 + "}"
    elif op in ("insert", "delete", "replace") and text:
        i = rng.randrange(len(text))
        char = rng.choice('{}[]",:0 9a\\-\x00\u00e9')
        text = {"insert": text[:i] + char + text[i:], "delete": text[:i] + text[i + 1 :], "replace": text[:i] + char + text[i + 1 :]}[op]  # fmt: skip
    elif op == "unpadded":
        pad = False  # the data starts misaligned: valid for safetensors
    elif op == "leading_space":
        text = " " * rng.randrange(1, 9) + text
    elif op == "trailing":
        text = text + rng.choice(("x", "}", ",", "{}", "\n"))
    elif op == "utf16":
        return text.encode("utf-16"), op, pad
    elif op == "bom":
        return b"\xef\xbb\xbf" + text.encode(), op, pad
    elif op == "bad_utf8":
        raw = text.encode()
        i = rng.randrange(len(raw) + 1)
        return raw[:i] + rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80")) + raw[i:], op, pad
    return text, op, pad


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One stage-4 mutation of the file's bytes."""
    op = rng.choice(("length", "truncate", "append", "flip_header", "flip_data", "random", "empty"))
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if op == "length":
        new = rng.choice(
            (n + rng.randrange(-16, 17), 0, len(data), len(data) - 8, 2**63, rng.getrandbits(64), 100_000_001)
        )
        data = (new % 2**64).to_bytes(8, "little") + data[8:]
    elif op == "truncate":
        data = data[: rng.randrange(len(data) + 1)]
    elif op == "append":
        data = data + rng.randbytes(rng.randrange(1, 17))
    elif op == "flip_header" and 8 < 8 + n <= len(data):
        i = rng.randrange(8, 8 + n)
        data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    elif op == "flip_data" and 8 + n < len(data):  # tensor values only: the file still loads
        i = rng.randrange(8 + n, len(data))
        data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
    elif op == "random":
        data = rng.randbytes(rng.randrange(64))
    elif op == "empty":
        data = b""
    return data, op


# How many mutations of each stage are applied, drawn per stage (most mutants get one or two).
STAGE_WEIGHTS = {"tensors": 0.55, "header": 0.35, "text": 0.25, "bytes": 0.2}


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """A mutant of the safetensors file `data`: 1 to 3 mutations of stages 1-4 (see the docstring)."""
    stages = [s for s, w in STAGE_WEIGHTS.items() if rng.random() < w] or [rng.choice(list(STAGE_WEIGHTS))]
    applied = []
    metadata, tensors = parse(data)
    if "tensors" in stages:
        for _ in range(rng.choice((1, 1, 2))):
            metadata, op = mutate_tensors(rng, metadata, tensors)
            applied.append(f"tensors.{op}")
    pairs, body = layout(metadata, tensors)
    if "header" in stages:
        pairs, op = mutate_header(rng, pairs)
        applied.append(f"header.{op}")
    text, pad = header_text(pairs), True
    if "text" in stages:
        text, op, pad = mutate_text(rng, text)
        applied.append(f"text.{op}")
    out = assemble(text, body, pad)
    if "bytes" in stages:
        out, op = mutate_bytes(rng, out)
        applied.append(f"bytes.{op}")
    return out, applied


# ----------------------------------------------------------------------------------------------
# What the tools make of a mutant


def _run(fn):
    """('ok', value) or (exception type name, exception)."""
    try:
        return "ok", fn()
    except CheckpointError as e:
        return "CheckpointError", e
    except Exception as e:  # noqa: BLE001  (what the fuzz is looking for)
        return type(e).__name__, e


def check(path: Path, kind: str) -> dict:
    """Every way the tools read a file of `kind` ('transformer' or 'ae'), and what each made of it.

    Returns {"outcome": "loaded OK" | "CheckpointError" | <other exception type>, "ops": {op: status},
    "problems": [...], "error": (op, the first unexpected exception) or None, "refusal": the load's
    CheckpointError message or None, "stricter": read_header's message for a file safetensors reads}.
    """
    name = FLUX2_PRESET if kind.startswith("flux2-") else PRESET
    preset, model = get_preset(name), kind.removeprefix("flux2-")
    if kind == "transformer":
        calls = {
            "read": lambda: read_flux_params(path),
            "load": lambda: load_flow_model(path),
            "load_preset": lambda: load_flow_model(path, preset=PRESET),
        }
    elif kind == "ae":
        calls = {
            "read": lambda: read_ae_params(path),
            "load": lambda: load_autoencoder(path),
            "load_preset": lambda: load_autoencoder(path, params=preset.ae_params),
        }
    elif kind == "flux2-transformer":
        calls = {
            "read": lambda: read_flux2_params(path),
            "load": lambda: load_flux2_model(path),
            "load_preset": lambda: load_flux2_model(path, preset=FLUX2_PRESET),
        }
    else:
        calls = {
            "read": lambda: check_flux2_autoencoder(open_weights(path, "ae")),
            "load": lambda: load_flux2_autoencoder(path),
            "load_preset": lambda: load_flux2_autoencoder(path, params=preset.ae_params),
        }
    calls["verify"] = lambda: verify_file(path, name, model=model)
    calls["inspect"] = lambda: inspect_path(path, model=model)
    results = {name: _run(fn) for name, fn in calls.items()}
    ops = {name: status for name, (status, _) in results.items()}
    problems, error = [], None
    for name, (status, value) in results.items():
        if status == "CheckpointError":
            message = str(value)
            if "\n" in message:
                problems.append(f"{name}: multi-line CheckpointError")
            if str(path) not in message:
                problems.append(f"{name}: CheckpointError without the file's name")
        elif status != "ok" and error is None:
            error = (name, value)
    status, value = results["verify"]
    if status == "ok":
        ops["verify"] = "ok" if value.ok else "fail"
    if ops["verify"] in ("ok", "fail") and (ops["verify"] == "ok") != (ops["load_preset"] == "ok"):
        problems.append(f"verify says {ops['verify']}, load with the preset: {ops['load_preset']}")
    status, value = results["inspect"]
    if status == "ok":
        ops["inspect"] = "ok" if value[0]["problem"] is None else "problem"
        if (ops["inspect"] == "ok") != (ops["load"] == "ok"):
            problems.append(f"inspect says {ops['inspect']}, load without a preset: {ops['load']}")
    elif ops["load"] == "ok" and status == "CheckpointError":
        problems.append("inspect refuses a file that loads")
    if (ops["read"] == "ok") != (ops["load"] == "ok") and {ops["read"], ops["load"]} <= {
        "ok",
        "CheckpointError",
    }:
        problems.append(f"read params: {ops['read']}, load: {ops['load']}")
    if error is not None:
        outcome = type(error[1]).__name__
    else:
        outcome = "loaded OK" if ops["load"] == "ok" else "CheckpointError"
    refusal = str(results["load"][1]) if ops["load"] == "CheckpointError" else None
    # Against safetensors' own reader: a file it reads that read_header refuses is one where we are
    # stricter (a key twice, a dtype we do not load); the reverse would be a gap in our checks.
    ops["safetensors"], _ = _run(lambda: _safetensors_reads(path))
    header, value = _run(lambda: read_header(path))
    stricter = str(value) if ops["safetensors"] == "ok" and header == "CheckpointError" else None
    if header == "ok" and ops["safetensors"] != "ok":
        problems.append("read_header accepts a file safetensors refuses")
    return {
        "outcome": outcome,
        "ops": ops,
        "problems": problems,
        "error": error,
        "refusal": refusal,
        "stricter": stricter,
    }


def _safetensors_reads(path: Path) -> None:
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            f.get_tensor(key)


def _message_kind(message: str, path: Path) -> str:
    """A CheckpointError message with the file and the numbers taken out: what kind of refusal it is."""
    text = message.replace(str(path), "FILE")
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return text[:110]


# ----------------------------------------------------------------------------------------------
# The run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="mutants (default 2000; the recorded run: 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--examples", type=int, default=3, help="examples kept per unexpected outcome")
    p.add_argument("--out", type=Path, default=RESULTS / "fuzz_checkpoints.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    outcomes, by_kind, ops, mutations, problems = Counter(), Counter(), Counter(), Counter(), Counter()
    refusals, stricter = Counter(), Counter()
    examples: dict[str, list] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {kind: path.read_bytes() for kind, path in write_base_files(tmp).items()}
        path = tmp / "mutant.safetensors"
        for i in range(args.n):
            kind = KINDS[i % len(KINDS)]
            data, applied = mutate(base[kind], rng)
            path.write_bytes(data)
            result = check(path, kind)
            outcomes[result["outcome"]] += 1
            by_kind[(kind, result["outcome"])] += 1
            mutations.update(applied)
            ops.update(f"{op}: {status}" for op, status in result["ops"].items())
            problems.update(result["problems"])
            if result["refusal"] is not None:
                refusals[_message_kind(result["refusal"], path)] += 1
            if result["stricter"] is not None:
                stricter[_message_kind(result["stricter"], path)] += 1
            unexpected = [result["outcome"]] if result["error"] else []
            unexpected += [f"problem: {p}" for p in result["problems"]]
            for label in unexpected:
                kept = examples.setdefault(label, [])
                if len(kept) < args.examples:
                    op, e = result["error"] if result["error"] else ("-", None)
                    kept.append({
                        "mutant": i, "kind": kind, "mutations": applied, "op": op,
                        "message": None if e is None else str(e)[:500],
                        "traceback": None if e is None else "".join(traceback.format_exception(e)[-3:])[-1500:],
                    })  # fmt: skip
            if (i + 1) % 1000 == 0:
                print(
                    f"{i + 1}/{args.n} mutants, {time.perf_counter() - start:.0f} s: {dict(outcomes)}",
                    flush=True,
                )
    elapsed = time.perf_counter() - start
    result = {
        "benchmark": "fuzz_checkpoints",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"n": args.n, "seed": args.seed, "threads": args.threads, "preset": PRESET},
        "machine": machine_info("cpu"),
        "elapsed_s": round(elapsed, 1),
        "outcomes": dict(outcomes.most_common()),
        "outcomes_by_file": {f"{k} {o}": c for (k, o), c in sorted(by_kind.items())},
        "problems": dict(problems.most_common()),
        "ops": dict(sorted(ops.items())),
        "mutations": dict(sorted(mutations.items())),
        "refusals": dict(refusals.most_common(60)),
        "stricter_than_safetensors": dict(stricter.most_common()),
        "examples": examples,
    }
    write_json(args.out, result)
    print()
    print(table(result))
    print(f"\n{args.n} mutants in {elapsed:.0f} s; wrote {args.out}")
    return result


def table(result: dict) -> str:
    n = sum(result["outcomes"].values())
    lines = ["| outcome | mutants | share | example |", "|---|---|---|---|"]
    rows = list(result["outcomes"].items()) + [(f"problem: {p}", c) for p, c in result["problems"].items()]
    for outcome, count in rows:
        example = result["examples"].get(outcome, [None])[0]
        cell = (
            ""
            if example is None
            else f"{'+'.join(example['mutations'])}: {example['op']}: {example['message']}"
        )
        lines.append(f"| {outcome} | {count} | {count / n:.1%} | {cell[:160].replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
