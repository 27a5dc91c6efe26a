"""RoPE and attention against naive formulas, property-tested over shapes."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_core.layers import EmbedND, timestep_embedding
from flux_core.math import apply_rope, attention, rope


def naive_rope(x: torch.Tensor, pos: torch.Tensor, theta: int) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of x (B, H, L, D) by pos * theta^(-2i/D), element by element, float64."""
    B, H, L, D = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(B):
        for n in range(L):
            for i in range(D // 2):
                a = float(pos[b, n]) * theta ** (-2 * i / D)
                x0, x1 = x[b, :, n, 2 * i].double(), x[b, :, n, 2 * i + 1].double()
                out[b, :, n, 2 * i] = x0 * math.cos(a) - x1 * math.sin(a)
                out[b, :, n, 2 * i + 1] = x0 * math.sin(a) + x1 * math.cos(a)
    return out


def naive_attention(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = w @ v  # (B, H, L, D)
    B, H, L, D = out.shape
    return out.permute(0, 2, 1, 3).reshape(B, L, H * D)


shapes = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 3),  # H
    st.integers(1, 9),  # L
    st.sampled_from([2, 4, 8, 16]),  # D
)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), max_pos=st.sampled_from([4, 300, 4096]))
def test_rope_matches_naive_rotation(shape, seed, max_pos):
    B, H, L, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, H, L, D, generator=g)
    pos = torch.randint(0, max_pos, (B, L), generator=g).float()
    pe = rope(pos, D, 10_000).unsqueeze(1)
    q_rot, k_rot = apply_rope(q, k, pe)
    torch.testing.assert_close(q_rot.double(), naive_rope(q, pos, 10_000), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot.double(), naive_rope(k, pos, 10_000), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_attention_matches_naive_softmax(shape, seed):
    B, H, L, D = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    pos = torch.randint(0, 64, (B, L), generator=g).float()
    pe = rope(pos, D, 10_000).unsqueeze(1)
    q_rot, k_rot = apply_rope(q, k, pe)
    out = attention(q, k, v, pe)
    assert out.shape == (B, L, H * D)
    torch.testing.assert_close(out.double(), naive_attention(q_rot, k_rot, v), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norms_and_relative_positions():
    # A rotation keeps lengths, and q.k after RoPE depends only on the position difference.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)

    def dot(pq, pk):
        qr, _ = apply_rope(q, q, rope(torch.tensor([[float(pq)]]), 32, 10_000).unsqueeze(1))
        kr, _ = apply_rope(k, k, rope(torch.tensor([[float(pk)]]), 32, 10_000).unsqueeze(1))
        return (qr * kr).sum().item(), qr.norm().item()

    d1, n1 = dot(3, 10)
    d2, _ = dot(103, 110)
    assert abs(n1 - q.norm().item()) < 1e-5
    assert abs(d1 - d2) < 1e-4


def test_embed_nd_concatenates_axes_in_order():
    # ids (0, row, col): the first 8 rotation dims follow axis 0, the next 12 the rows, the last 12 the columns.
    emb = EmbedND(dim=32, theta=10_000, axes_dim=[8, 12, 12])
    ids = torch.tensor([[[0.0, 5.0, 7.0]]])
    pe = emb(ids)
    assert pe.shape == (1, 1, 1, 16, 2, 2)
    torch.testing.assert_close(pe[0, 0, 0, :4], rope(torch.zeros(1, 1), 8, 10_000)[0, 0])
    torch.testing.assert_close(pe[0, 0, 0, 4:10], rope(torch.full((1, 1), 5.0), 12, 10_000)[0, 0])
    torch.testing.assert_close(pe[0, 0, 0, 10:], rope(torch.full((1, 1), 7.0), 12, 10_000)[0, 0])


def test_rope_angles_are_exact_at_large_positions():
    # float64 angles: at position 4000 the float32 rotation still matches the exact value to 1e-6.
    pe = rope(torch.tensor([[4000.0]]), 16, 10_000)
    assert abs(pe[0, 0, 0, 0, 0].item() - math.cos(4000.0)) < 1e-6
    assert abs(pe[0, 0, 0, 1, 0].item() - math.sin(4000.0)) < 1e-6


def test_timestep_embedding_scales_t_by_1000_once():
    t = torch.tensor([0.25])
    emb = timestep_embedding(t, 256)
    freqs = torch.exp(-math.log(10_000) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[0, :128], torch.cos(250.0 * freqs))
    torch.testing.assert_close(emb[0, 128:], torch.sin(250.0 * freqs))
