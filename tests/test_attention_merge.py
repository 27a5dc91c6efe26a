"""Split attention merged through log-sum-exp equals attention over all keys."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_core.math import joint_attention
from fluxspace.attention import attention_with_lse, attention_with_lse_reference, merge_attention


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), q=st.integers(1, 9), s1=st.integers(1, 7), s2=st.integers(1, 7),
    d=st.sampled_from([4, 8, 16]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_merged_parts_equal_full_attention(b, h, q, s1, s2, d, seed):
    g = torch.Generator().manual_seed(seed)
    qs = torch.randn(b, h, q, d, generator=g)
    k1, v1 = torch.randn(b, h, s1, d, generator=g), torch.randn(b, h, s1, d, generator=g)
    k2, v2 = torch.randn(b, h, s2, d, generator=g), torch.randn(b, h, s2, d, generator=g)
    full = joint_attention(qs, torch.cat((k1, k2), 2), torch.cat((v1, v2), 2))  # (B, Q, H*D)
    merged = merge_attention([attention_with_lse(qs, k1, v1), attention_with_lse(qs, k2, v2)])  # (B, H, Q, D)
    merged = merged.permute(0, 2, 1, 3).reshape(b, q, h * d)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-6)


def test_fused_kernel_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g) * 3 for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = attention_with_lse_reference(q, k, v)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 11)
