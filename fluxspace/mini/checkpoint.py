"""The training checkpoint of flux-mini (train.py): one safetensors file, no pickle.

Tensors, by name:
    model.<key>               the trained weights (model.state_dict())
    ema.<key>                 the EMA weights
    optimizer.<i>.<name>      AdamW's per-parameter state: step, exp_avg, exp_avg_sq of parameter i
    generator                 the run's CPU torch.Generator state (uint8)
Everything else is JSON text in the file's metadata, under "checkpoint":
    {"step", "seconds", "config" (TrainConfig as a dict), "param_groups" (the optimizer's
     hyper-parameters and parameter indices, as in optimizer.state_dict())}

One file, so a kill can never pair one step's weights with another step's state, and written
through atomic_file, so a kill leaves the previous checkpoint whole. torch.save / torch.load would
pickle: a checkpoint from elsewhere could run code when resumed. Checkpoints of the pickle format
(checkpoint.pt, before this file existed) are not read: resume needs a checkpoint written by this
version (train.py refuses such a folder with a message rather than starting afresh over it).
"""

import json
import os
from pathlib import Path

import safetensors.torch
from torch import Tensor

from flux_core.atomic import atomic_file
from flux_core.files import read_header

FORMAT = "flux-mini training checkpoint"
VERSION = "1"
PARTS = ("model", "ema")  # state dicts stored under their name as prefix


def _cpu(t: Tensor) -> Tensor:
    # clone: safetensors refuses tensors that share memory, and .cpu() of a CPU tensor is the tensor.
    return t.detach().to("cpu", copy=True).contiguous()


def save_checkpoint(
    path: str | os.PathLike,
    model: dict[str, Tensor],
    ema: dict[str, Tensor],
    optimizer: dict,
    generator: Tensor,
    step: int,
    seconds: float,
    config: dict,
) -> Path:
    """Write a checkpoint atomically. model/ema: state dicts; optimizer: optimizer.state_dict();
    generator: generator.get_state(); config: asdict(TrainConfig)."""
    path = Path(path)
    tensors = {
        f"{part}.{k}": _cpu(v) for part, sd in zip(PARTS, (model, ema), strict=True) for k, v in sd.items()
    }
    for i, state in optimizer["state"].items():
        for name, value in state.items():
            assert isinstance(value, Tensor), f"optimizer state {i}.{name} is not a tensor: {value!r}"
            tensors[f"optimizer.{i}.{name}"] = _cpu(value)
    tensors["generator"] = _cpu(generator)
    rest = {"step": step, "seconds": seconds, "config": config, "param_groups": optimizer["param_groups"]}
    metadata = {"format": FORMAT, "version": VERSION, "checkpoint": json.dumps(rest)}
    with atomic_file(path) as f:  # a temporary file, then a rename: never half a checkpoint
        f.write(safetensors.torch.save(tensors, metadata=metadata))
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint (on the CPU) back into the dict train.py saved: "model", "ema" (state dicts),
    "optimizer" (a state dict for optimizer.load_state_dict), "generator", "step", "seconds", "config"."""
    path = Path(path)
    _, _, metadata = read_header(path)  # CheckpointError for a missing, truncated or corrupt file
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a {FORMAT} of version {VERSION} (its metadata format is "
            f"{metadata.get('format')!r}, version {metadata.get('version')!r}); start afresh without resume"
        )
    rest = json.loads(metadata["checkpoint"])
    out = {part: {} for part in PARTS}
    moments: dict[int, dict[str, Tensor]] = {}
    for key, value in safetensors.torch.load_file(path).items():
        part, _, name = key.partition(".")
        if part in PARTS:
            out[part][name] = value
        elif part == "optimizer":
            i, _, moment = name.partition(".")
            moments.setdefault(int(i), {})[moment] = value
        else:
            assert key == "generator", key
            out["generator"] = value
    # JSON has no tuples; the optimizer's sequence hyper-parameters (AdamW's betas) are tuples.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in rest["param_groups"]
    ]
    # State keyed by parameter index, in index order as optimizer.state_dict() has it.
    out["optimizer"] = {"state": dict(sorted(moments.items())), "param_groups": groups}
    return out | {"step": rest["step"], "seconds": rest["seconds"], "config": rest["config"]}
