"""The Flux rectified-flow transformer: frozen hyper-parameters and the model.

Mirrors `flux/model.py` of the official BFL release. Module names equal the checkpoint keys.

Letters: B batch, T text tokens, N image tokens, C hidden channels.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .blocks import DoubleStreamBlock, SingleStreamBlock
from .layers import EmbedND, LastLayer, MLPEmbedder, timestep_embedding
from .seam import Edit, ModVectors

# Width of the sinusoidal time / guidance embedding fed to `time_in` and `guidance_in`.
TIME_EMBED_DIM = 256


@dataclass(frozen=True)
class FluxParams:
    in_channels: int  # packed latent channels: AE z_channels * 2 * 2
    out_channels: int
    vec_in_dim: int  # width of the pooled CLIP vector
    context_in_dim: int  # width of the T5 token embeddings
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    axes_dim: tuple[int, ...]  # RoPE dims per id axis; they sum to the head dim
    theta: int
    qkv_bias: bool
    guidance_embed: bool  # True for the guidance-distilled dev models

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(
                f"axes_dim {tuple(self.axes_dim)} sums to {sum(self.axes_dim)}, "
                f"but the head dim is {self.hidden_size // self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class Flux(nn.Module):
    """Transformer model for flow matching on sequences of packed latent patches."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = (
            MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=params.hidden_size) if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, qkv_bias=params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels)

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """vec = time_in(t) + guidance_in(g) [dev only] + vector_in(pooled CLIP). Returns (B, C)."""
        vec = self.time_in(timestep_embedding(timesteps, TIME_EMBED_DIM))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (dev): pass `guidance`, e.g. 3.5 per sample")
            vec = vec + self.guidance_in(timestep_embedding(guidance, TIME_EMBED_DIM))
        return vec + self.vector_in(y)

    def forward(
        self,
        img: Tensor,  # (B, N, in_channels) packed latents
        img_ids: Tensor,  # (B, N, 3)
        txt: Tensor,  # (B, T, context_in_dim) T5 embeddings
        txt_ids: Tensor,  # (B, T, 3)
        timesteps: Tensor,  # (B,) t in [0, 1]
        y: Tensor,  # (B, vec_in_dim) pooled CLIP
        guidance: Tensor | None = None,  # (B,) guidance scale, dev models only
        edit: Edit | None = None,  # an edit or a recorder (seam.py); None is the plain model, bit for bit
    ) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C); got {tuple(img.shape)} and {tuple(txt.shape)}")
        img = self.img_in(img)  # (B, N, C)
        vec = self.conditioning(timesteps, y, guidance)  # (B, C)
        txt = self.txt_in(txt)  # (B, T, C)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # (B, 1, T+N, D/2, 2, 2)
        if edit is None:
            vecs = ModVectors(img=vec, txt=vec, out=vec)
        else:
            vecs = edit.vectors(self, vec, timesteps, y, guidance)  # coarse edits change these

        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vecs.img, pe, txt_vec=vecs.txt, edit=edit, index=i, timesteps=timesteps)

        T = txt.shape[1]
        x = torch.cat((txt, img), dim=1)  # (B, T+N, C)
        for i, block in enumerate(self.single_blocks):
            x = block(x, vecs.out, pe, edit=edit, index=i, n_txt=T, timesteps=timesteps)  # (B, T+N, C)
        img = x[:, T:, ...]  # (B, N, C)

        return self.final_layer(img, vecs.out)  # (B, N, out_channels)
