"""The FLUX.2 rectified-flow transformer: frozen hyper-parameters, the model and its sizes.

Mirrors `Flux2` / `Flux2Params` of `src/flux2/model.py` (black-forest-labs/flux2). Module names equal
the checkpoint keys, so an official file loads with `strict=True`.

Letters: B batch, T text tokens, N image tokens, C hidden channels.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers import EmbedND, LastLayer, MLPEmbedder, Modulation, timestep_embedding
from ..model import TIME_EMBED_DIM
from ..seam import Edit, ModVectors
from .blocks import DoubleStreamBlock, SingleStreamBlock
from .layers import Flux2Modulations


@dataclass(frozen=True)
class Flux2Params:
    """Defaults are the official `Flux2Params()`, i.e. FLUX.2 [dev] (flux2/util.py FLUX2_MODEL_INFO)."""

    in_channels: int = 128  # AE z_channels 32 * 2 * 2 patch; output has the same width
    context_in_dim: int = 15360  # text features per token: 3 stacked LLM layers (dev: 3 x 5120 Mistral)
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE dims per id axis (t, h, w, l); they sum to the head dim
    theta: int = 2000
    mlp_ratio: float = 3.0
    # The official snapshot (dev only) always has `guidance_in`. FLUX.2 [klein] has none: diffusers'
    # Flux2Transformer2DModel `guidance_embeds=False` (see SIZES), so the key set drops guidance_in.*.
    guidance_embed: bool = True

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


# Named transformer sizes (the presets of flux_core/presets.py add steps, guidance, text encoder and
# autoencoder to them). dev: the official defaults. klein: huggingface/diffusers
# scripts/convert_flux2_to_diffusers.py `get_flux2_transformer_config` ("klein-4b", "klein-9b"):
# attention_head_dim 128, mlp_ratio 3, axes (32,)*4, theta 2000, guidance_embeds False, and
#   klein-4b: 24 heads (hidden 3072), 5 double + 20 single blocks, joint_attention_dim 7680
#             (= 3 x 2560, Qwen3-4B hidden states of 3 layers);
#   klein-9b: 32 heads (hidden 4096), 8 double + 24 single blocks, joint_attention_dim 12288
#             (= 3 x 4096, Qwen3-8B).
# Not checked against the released klein safetensors themselves (not reachable from here). The
# "base" (undistilled) and distilled klein checkpoints share these sizes; they differ in weights only.
SIZES: dict[str, Flux2Params] = {
    "flux2-dev": Flux2Params(),
    "flux2-klein-4b": Flux2Params(
        context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, guidance_embed=False
    ),
    "flux2-klein-9b": Flux2Params(
        context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, guidance_embed=False
    ),
}


def get_params(name: str) -> Flux2Params:
    """The Flux2Params of a named size (exact name)."""
    if name not in SIZES:
        raise KeyError(f"unknown FLUX.2 size {name!r}; valid: {', '.join(SIZES)}")
    return SIZES[name]


class Flux2(nn.Module):
    """Transformer model for flow matching on sequences of packed latent patches (FLUX.2)."""

    def __init__(self, params: Flux2Params):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.in_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        C = params.hidden_size
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(params.in_channels, C, bias=False)
        self.time_in = MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=C, bias=False)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=C, bias=False)
        self.txt_in = nn.Linear(params.context_in_dim, C, bias=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(C, params.num_heads, params.mlp_ratio) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(C, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)
        )
        # One modulation per stream kind for the whole model, not one per block (flux2/model.py).
        self.double_stream_modulation_img = Modulation(C, double=True, bias=False)
        self.double_stream_modulation_txt = Modulation(C, double=True, bias=False)
        self.single_stream_modulation = Modulation(C, double=False, bias=False)
        self.final_layer = LastLayer(C, 1, self.out_channels, bias=False)

    def conditioning(self, timesteps: Tensor, guidance: Tensor | None) -> Tensor:
        """vec = time_in(t) + guidance_in(g) [when the model has it]; no pooled text. Returns (B, C)."""
        vec = self.time_in(timestep_embedding(timesteps, TIME_EMBED_DIM))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.2 model embeds guidance (dev): pass `guidance`, e.g. 4.0 per sample")
            vec = vec + self.guidance_in(timestep_embedding(guidance, TIME_EMBED_DIM))
        return vec

    def modulations(self, vecs: ModVectors) -> Flux2Modulations:
        """The shared modulation layers applied once: image and text streams of the double blocks, single blocks."""
        single, _ = self.single_stream_modulation(vecs.out)
        return Flux2Modulations(
            vecs=vecs,
            img=self.double_stream_modulation_img(vecs.img),
            txt=self.double_stream_modulation_txt(vecs.txt),
            single=single,
            img_layer=self.double_stream_modulation_img,
            txt_layer=self.double_stream_modulation_txt,
        )

    def forward(
        self,
        img: Tensor,  # (B, N, in_channels) packed latents
        img_ids: Tensor,  # (B, N, 4) (t, h, w, l) position ids
        timesteps: Tensor,  # (B,) t in [0, 1]
        txt: Tensor,  # (B, T, context_in_dim) stacked LLM hidden states
        txt_ids: Tensor,  # (B, T, 4)
        guidance: Tensor | None = None,  # (B,) guidance scale; models with guidance_embed only (ignored otherwise)
        edit: Edit | None = None,  # an edit or a recorder (seam.py); None is the plain model, bit for bit
    ) -> Tensor:
        n_axes = len(self.params.axes_dim)
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C); got {tuple(img.shape)} and {tuple(txt.shape)}")
        if img_ids.shape[-1] != n_axes or txt_ids.shape[-1] != n_axes:
            raise ValueError(
                f"FLUX.2 position ids have {n_axes} axes (t, h, w, l): got img_ids {tuple(img_ids.shape)} "
                f"and txt_ids {tuple(txt_ids.shape)}"
            )
        vec = self.conditioning(timesteps, guidance)  # (B, C)
        img = self.img_in(img)  # (B, N, C)
        txt = self.txt_in(txt)  # (B, T, C)
        # The official code embeds img_ids and txt_ids apart and concatenates the rotations; RoPE is per
        # token, so embedding the concatenated ids once is the same tensor.
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # (B, 1, T+N, D/2, 2, 2)
        if edit is None:
            vecs = ModVectors(img=vec, txt=vec, out=vec)
        else:
            vecs = edit.vectors(self, vec, timesteps, None, guidance)  # FLUX.2 has no pooled text: y is None
        mods = self.modulations(vecs)

        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, pe, mods, edit=edit, index=i, timesteps=timesteps)

        T = txt.shape[1]
        x = torch.cat((txt, img), dim=1)  # (B, T+N, C)
        for i, block in enumerate(self.single_blocks):
            x = block(x, pe, mods.single, edit=edit, index=i, n_txt=T, timesteps=timesteps)  # (B, T+N, C)
        img = x[:, T:, ...]  # (B, N, C)

        return self.final_layer(img, vecs.out)  # (B, N, out_channels)
