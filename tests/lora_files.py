"""Random LoRA files in each format, written from module names the formats use (not from our tables),
and what the LoRA tests of both families (tests/test_lora.py, tests/test_flux2_lora.py) run them with.

Official (BFL) names come from our model's module tree (they are the checkpoint's names);
diffusers names from diffusers' own FluxTransformer2DModel, so the reader's rename table is tested
against an independent source.
"""

import torch
from safetensors.torch import save_file
from torch import nn


def linear_names(model: nn.Module, keep=lambda name: True) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n)}


def in_blocks(name: str) -> bool:
    return name.startswith(("double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks."))


def random_pairs(shapes: dict[str, tuple[int, int]], rank: int, seed: int, std: float = 0.05):
    """name -> (down (r, in), up (out, r)), random (up is not zero: every update changes the output)."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(rank, i, generator=g) * std, torch.randn(o, rank, generator=g) * std)
        for name, (o, i) in sorted(shapes.items())
    }


def diffusers_file(pairs, prefix: str = "transformer.", default: bool = False, alpha: float | None = None):
    mid = ".default" if default else ""
    sd = {}
    for name, (down, up) in pairs.items():
        sd[f"{prefix}{name}.lora_A{mid}.weight"] = down
        sd[f"{prefix}{name}.lora_B{mid}.weight"] = up
        if alpha is not None:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return sd


def kohya_file(pairs, prefix: str, alpha: float):
    sd = {}
    for name, (down, up) in pairs.items():
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def bfl_file(pairs, biases: dict[str, torch.Tensor] | None = None, prefix: str = ""):
    sd = {}
    for name, (down, up) in pairs.items():
        sd[f"{prefix}{name}.lora_A.weight"] = down
        sd[f"{prefix}{name}.lora_B.weight"] = up
        if biases is not None:
            sd[f"{prefix}{name}.lora_B.bias"] = biases[name]
    return sd


# XLabs' double-block processor LoRAs (x-flux src/flux/modules/layers.py): 1 image, 2 text stream.
XLABS = ("qkv_lora1", "qkv_lora2", "proj_lora1", "proj_lora2")


def xlabs_file(model: nn.Module, rank: int, seed: int, std: float = 0.05):
    """An XLabs LoRA on every double block's attention and every single block's qkv / proj."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.params.hidden_size
    sd = {}
    for i in range(len(model.double_blocks)):
        for name in XLABS:
            out = 3 * hidden if "qkv" in name else hidden
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = torch.randn(rank, hidden, generator=g) * std
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = torch.randn(out, rank, generator=g) * std
    mlp = model.single_blocks[0].linear2.in_features
    for i in range(len(model.single_blocks)):
        sd[f"single_blocks.{i}.processor.qkv_lora.down.weight"] = torch.randn(rank, hidden, generator=g) * std
        sd[f"single_blocks.{i}.processor.qkv_lora.up.weight"] = torch.randn(3 * hidden, rank, generator=g) * std
        sd[f"single_blocks.{i}.processor.proj_lora.down.weight"] = torch.randn(rank, mlp, generator=g) * std
        sd[f"single_blocks.{i}.processor.proj_lora.up.weight"] = torch.randn(hidden, rank, generator=g) * std
    return sd


def write(tmp_path, sd, name="lora.safetensors", metadata=None):
    """Save the LoRA state dict `sd` as tmp_path/name; its path."""
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def run_ours(model, x):
    """Our model's forward on the inputs dict `x`, without autograd."""
    with torch.inference_mode():
        return model(**x)


def adapter_outputs(ref, run_ref, x, scales):
    """diffusers' forward `run_ref(ref, x)` with the LoRA adapter "t" already loaded into `ref`, at each
    strength; the adapter is deleted afterwards, whatever happens."""
    try:
        outs = []
        for s in scales:
            ref.set_adapters("t", s)
            outs.append(run_ref(ref, x))
        return outs
    finally:
        ref.delete_adapters("t")
