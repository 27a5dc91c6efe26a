"""GPU memory of each residency mode for the official models, as fluxspace estimates it before loading.

Every part is built on the meta device at its official size (no weights, no files): the transformer
and autoencoder from the presets, the text encoders from their published configs (T5-XXL and CLIP-L
for FLUX.1; Mistral-Small-3.x 24B's language model for FLUX.2 [dev]; Qwen3-4B / Qwen3-8B for
[klein] 4B / 9B). Parameters are counted per part and per streamed text layer as
resources.part_weights / text_layer_weights read them from the files, and each mode's figure is what
`fluxspace` checks before it loads anything: runtime.resident_bytes (the weights on the GPU at the
peak) plus resources.footprint (the activations of a FluxSpace edit with one concept at 1024 x 1024,
bf16; two rows a step where the preset samples with true CFG, as the klein base models do). Estimates, not measurements: benchmarks/gpu_check.sh measures on a GPU.

    python benchmarks/memory_estimates.py                      # flux-dev, flux2-klein-4b, flux2-klein-9b, flux2-dev
    python benchmarks/memory_estimates.py --presets flux2-dev --block-group 1
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    MistralConfig,
    MistralModel,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import write_json  # noqa: E402  (the shared harness)

from flux_core.presets import MODEL_CLASSES, get_preset  # noqa: E402
from flux_core.runtime.fp8 import is_quantized_weight  # noqa: E402
from fluxspace.models import text_length  # noqa: E402
from fluxspace.resources import GiB, footprint  # noqa: E402
from fluxspace.runtime import Residency, resident_bytes  # noqa: E402
from fluxspace.settings import true_cfg  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# The text encoders' published configs (config.json of each model's repository).
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")  # fmt: skip
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77)  # fmt: skip
LLMS = {
    "dev": (MistralConfig, MistralModel, dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                                              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                              vocab_size=131072)),  # Mistral-Small-3.x 24B
    "klein-4b": (Qwen3Config, Qwen3Model, dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                               vocab_size=151936)),  # Qwen3-4B
    "klein-9b": (Qwen3Config, Qwen3Model, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                               vocab_size=151936)),  # Qwen3-8B
}  # fmt: skip
# (mode, residency, fp8, the flags that choose it)
MODES = (
    ("resident", Residency(), False, "(none)"),
    ("model offload", Residency(offload="model"), False, "--offload model"),
    ("model offload + fp8", Residency(offload="model"), True, "--offload model --weights fp8"),
    ("block streaming", Residency(offload="blocks"), False, "--offload blocks"),
    ("block streaming + fp8", Residency(offload="blocks"), True, "--offload blocks --weights fp8"),
)
# The presets whose text encoders' configs are above.
OFFICIAL = ("flux-dev", "flux-schnell", "flux-krea-dev", "flux-kontext-dev", "flux2-dev", "flux2-klein-4b",
            "flux2-klein-9b", "flux2-klein-base-4b", "flux2-klein-base-9b")  # fmt: skip


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parts(preset) -> tuple[dict[str, int], list[int], int]:
    """(parameters per part, parameters per streamed text layer, fp8-held weights) of a preset's model."""
    flow_cls, ae_cls = MODEL_CLASSES[preset.family]
    with torch.device("meta"):
        flow, ae = flow_cls(preset.params), ae_cls(preset.ae_params)
        if preset.family == "flux1":
            t5 = T5EncoderModel(T5Config(**T5_XXL))
            clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            text, layers = numel(t5) + numel(clip), [numel(b) for b in t5.encoder.block]
        else:
            size = "dev" if preset.text_encoder == "dev" else preset.name.removeprefix("flux2-").replace("base-", "")
            config_cls, model_cls, config = LLMS[size]
            llm = model_cls(config_cls(**config))
            text, layers = numel(llm), [numel(layer) for layer in llm.layers]
    n_fp8 = sum(v.numel() for k, v in flow.state_dict().items() if is_quantized_weight(k, tuple(v.shape)))
    return {"flow": numel(flow), "ae": numel(ae), "text": text}, layers, n_fp8


def estimate(name: str, block_group: int, size: int) -> dict:
    preset = get_preset(name)
    counts, layers, n_fp8 = parts(preset)
    pixels_per_token = 2 * preset.ae_params.downsampling
    rows = []
    for mode, residency, fp8, flags in MODES:
        residency = Residency(offload=residency.offload, block_group=block_group)
        weights = resident_bytes(counts, preset.params, residency, "cuda", torch.bfloat16, n_fp8 if fp8 else 0, layers)
        need = footprint(weights, preset.params, preset.ae_params, text_length(preset), size, size,
                         pixels_per_token, 1, true_cfg(preset), 2, torch.bfloat16)  # fmt: skip
        rows.append({"mode": mode, "flags": flags, "weights_gib": weights / GiB,
                     "activations_gib": need.activations / GiB, "total_gib": need.total / GiB})  # fmt: skip
    return {"preset": name, "parameters": counts, "text_layers": len(layers), "fp8_weights": n_fp8, "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="flux-dev,flux2-klein-4b,flux2-klein-9b,flux2-dev")
    p.add_argument("--block-group", type=int, default=Residency().block_group, help="blocks per streamed group")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/memory_estimates.json)")
    args = p.parse_args(argv)
    unknown = [name for name in args.presets.split(",") if name not in OFFICIAL]
    if unknown:
        p.error(f"--presets {unknown[0]!r}: no published text-encoder config here; valid: {', '.join(OFFICIAL)}")
    results = [estimate(name, args.block_group, args.size) for name in args.presets.split(",")]
    for r in results:
        c = r["parameters"]
        print(f"\n{r['preset']}: transformer {c['flow'] / 1e9:.2f}B, text encoder(s) {c['text'] / 1e9:.2f}B "
              f"({r['text_layers']} streamed layers), autoencoder {c['ae'] / 1e6:.0f}M parameters; "
              f"FluxSpace edit, one concept, {args.size} x {args.size}, bf16, block group {args.block_group}")  # fmt: skip
        print("| mode | flags | weights GiB | activations GiB | total GiB |\n|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['mode']} | `{row['flags']}` | {row['weights_gib']:.1f} | {row['activations_gib']:.1f} "
                  f"| {row['total_gib']:.1f} |")  # fmt: skip
    out = args.out or RESULTS / "memory_estimates.json"
    data = {"benchmark": "memory_estimates", "settings": vars(args) | {"out": str(out)}, "results": results}
    write_json(out, data)
    print(f"\nwrote {out}")
    return data


if __name__ == "__main__":
    main()
