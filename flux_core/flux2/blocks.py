"""The two transformer blocks of FLUX.2: double-stream (MM-DiT) and single-stream.

Mirrors `DoubleStreamBlock` and `SingleStreamBlock` of `src/flux2/model.py` (black-forest-labs/flux2);
attribute names are its checkpoint keys. Against FLUX.1's blocks (flux_core/blocks.py): no biases,
SwiGLU MLPs, and no modulation layers inside the blocks: the block receives the (shift, scale, gate)
sets the model computed once per forward (`Flux2Modulations`). Token order is [txt ; img].

The edit seam sits at the same marked point as in FLUX.1's blocks (q, k, v normed and rotated) and
hands the edit the same site types (flux_core/seam.py).

Letters: B batch, L tokens (T text, N image), C channels, H heads, D head dim.
"""

import torch
from einops import rearrange
from torch import Tensor, nn

from ..layers import ModulationOut, QKNorm, SelfAttention, _layer_norm
from ..math import apply_rope, joint_attention
from ..seam import DoubleBlockSite, Edit, SingleBlockSite
from .layers import Flux2Modulations, SwiGLU, swiglu_mlp


class DoubleStreamBlock(nn.Module):
    """Text and image streams with their own weights, joined only inside attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=False, proj_bias=False)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = swiglu_mlp(hidden_size, mlp_hidden_dim)

        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=False, proj_bias=False)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = swiglu_mlp(hidden_size, mlp_hidden_dim)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        mods: Flux2Modulations,
        edit: Edit | None = None,
        index: int = 0,
        timesteps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """pe: RoPE of [txt ; img] (B, 1, T+N, D/2, 2, 2); index and timesteps are only for the edit seam."""
        T = txt.shape[1]
        img_mod1, img_mod2 = mods.img  # each field (B, 1, C)
        txt_mod1, txt_mod2 = mods.txt  # each field (B, 1, C)

        img_modulated = img_mod1.modulate(self.img_norm1(img))  # (B, N, C)
        txt_modulated = txt_mod1.modulate(self.txt_norm1(txt))  # (B, T, C)
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_modulated)  # (B, H, N, D)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_modulated)  # (B, H, T, D)

        q = torch.cat((txt_q, img_q), dim=2)  # (B, H, T+N, D)
        k = torch.cat((txt_k, img_k), dim=2)  # (B, H, T+N, D)
        v = torch.cat((txt_v, img_v), dim=2)  # (B, H, T+N, D)
        q, k = apply_rope(q, k, pe)  # (B, H, T+N, D)

        # --- the edit seam (seam.py): with an edit, the edit returns this block's attention outputs
        if edit is None:
            attn = joint_attention(q, k, v)  # (B, T+N, C)
            img_attn_out = self.img_attn.proj(attn[:, T:])  # (B, N, C)
            txt_attn_out = self.txt_attn.proj(attn[:, :T])  # (B, T, C)
        else:
            site = DoubleBlockSite(
                index=index, block=self, timesteps=timesteps, img=img, txt=txt,
                vecs=mods.vecs, img_mod=img_mod1, txt_mod=txt_mod1,
                img_modulation=mods.img_layer, txt_modulation=mods.txt_layer,
                img_modulated=img_modulated, txt_modulated=txt_modulated, q=q, k=k, v=v, pe=pe,
            )  # fmt: skip
            img_attn_out, txt_attn_out = edit.double_block(site)

        img = img + img_mod1.gate * img_attn_out  # (B, N, C)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.modulate(self.img_norm2(img)))  # (B, N, C)
        txt = txt + txt_mod1.gate * txt_attn_out  # (B, T, C)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt)))  # (B, T, C)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt ; img] with attention and a SwiGLU MLP in parallel (ViT-22B style).

    `linear1` rows are [q | k | v | mlp value | mlp gate] (the MLP part is 2 x mlp_hidden wide);
    `linear2` columns are [attn | mlp].
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + 2 * self.mlp_hidden_dim, bias=False)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, bias=False)
        self.norm = QKNorm(head_dim)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = SwiGLU()

    def forward(
        self,
        x: Tensor,
        pe: Tensor,
        mod: ModulationOut,
        edit: Edit | None = None,
        index: int = 0,
        n_txt: int = 0,
        timesteps: Tensor | None = None,
    ) -> Tensor:
        """mod: the shared single-block modulation; n_txt, index and timesteps are only for the edit seam."""
        x_mod = mod.modulate(self.pre_norm(x))  # (B, L, C)
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, 2 * self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)  # (B, H, L, D)
        q, k = self.norm(q, k, v)
        q, k = apply_rope(q, k, pe)  # (B, H, L, D)

        # --- the edit seam (seam.py): with an edit, the edit returns this block's attention output
        if edit is None:
            attn = joint_attention(q, k, v)  # (B, L, C)
        else:
            site = SingleBlockSite(
                index=index, block=self, timesteps=timesteps, x=x, n_txt=n_txt, mod=mod, x_modulated=x_mod,
                q=q, k=k, v=v, pe=pe, mlp=mlp,
            )  # fmt: skip
            attn = edit.single_block(site)

        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))  # (B, L, C)
        return x + mod.gate * output  # (B, L, C)
