"""The two transformer blocks of Flux: double-stream (MM-DiT) and single-stream.

Mirrors `DoubleStreamBlock` and `SingleStreamBlock` of `flux/modules/layers.py` (BFL). Token order
is [txt ; img] everywhere, as in the official code.

Letters: B batch, L tokens (T text, N image), C channels, H heads, D head dim.
"""

import torch
from einops import rearrange
from torch import Tensor, nn

from .layers import Modulation, QKNorm, SelfAttention, _layer_norm, _mlp
from .math import apply_rope, joint_attention
from .seam import DoubleBlockSite, Edit, ModVectors, SingleBlockSite


class DoubleStreamBlock(nn.Module):
    """Text and image streams with their own weights, joined only inside attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: Tensor,
        txt_vec: Tensor | None = None,
        edit: Edit | None = None,
        index: int = 0,
        timesteps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """txt_vec: modulation vector of the text stream (default `vec`); edit: see seam.py."""
        T = txt.shape[1]
        txt_vec = vec if txt_vec is None else txt_vec
        img_mod1, img_mod2 = self.img_mod(vec)  # each field (B, 1, C)
        txt_mod1, txt_mod2 = self.txt_mod(txt_vec)  # each field (B, 1, C)

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
                vecs=ModVectors(img=vec, txt=txt_vec, out=vec), img_mod=img_mod1, txt_mod=txt_mod1,
                img_modulation=self.img_mod, txt_modulation=self.txt_mod,
                img_modulated=img_modulated, txt_modulated=txt_modulated, q=q, k=k, v=v, pe=pe,
            )  # fmt: skip
            img_attn_out, txt_attn_out = edit.double_block(site)

        img = img + img_mod1.gate * img_attn_out  # (B, N, C)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.modulate(self.img_norm2(img)))  # (B, N, C)
        txt = txt + txt_mod1.gate * txt_attn_out  # (B, T, C)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt)))  # (B, T, C)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt ; img] with attention and MLP in parallel (ViT-22B style).

    `linear1` rows are [q | k | v | mlp]; `linear2` columns are [attn | mlp].
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(head_dim)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(
        self,
        x: Tensor,
        vec: Tensor,
        pe: Tensor,
        edit: Edit | None = None,
        index: int = 0,
        n_txt: int = 0,
        timesteps: Tensor | None = None,
    ) -> Tensor:
        """n_txt (text tokens at the front of x), index and timesteps are only for the edit seam."""
        mod, _ = self.modulation(vec)  # each field (B, 1, C)
        x_mod = mod.modulate(self.pre_norm(x))  # (B, L, C)
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
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
