"""diffusers' own Flux transformer, configured for our FluxParams: the parity reference.

Tests and benchmarks compare our model with diffusers' FluxTransformer2DModel on the same weights;
this is the one place that maps our hyper-parameters to its constructor. diffusers is a dev extra,
so it is imported here, not at package import.
"""

import torch

from flux_core.model import FluxParams


def diffusers_transformer(params: FluxParams, device: str | torch.device = "meta"):
    """An empty FluxTransformer2DModel of the same shape (on the meta device by default: assign weights)."""
    from diffusers import FluxTransformer2DModel

    if params.mlp_ratio != 4.0 or not params.qkv_bias:
        raise ValueError("diffusers' Flux blocks are fixed to MLP ratio 4 with qkv biases")
    with torch.device(device):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=params.in_channels,
            out_channels=params.out_channels,
            num_layers=params.depth,
            num_single_layers=params.depth_single_blocks,
            attention_head_dim=params.head_dim,
            num_attention_heads=params.num_heads,
            joint_attention_dim=params.context_in_dim,
            pooled_projection_dim=params.vec_in_dim,
            guidance_embeds=params.guidance_embed,
            axes_dims_rope=tuple(params.axes_dim),
        )
