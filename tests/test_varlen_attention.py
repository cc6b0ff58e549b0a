"""The packing behind attn_implementation=flash_attention_2, checked on the CPU.

flash-attn's kernel needs CUDA; `reference_kernel` (per-sequence SDPA) stands in for it, so
what is tested here is the layout and the unpacking around the kernel: packed attention over
rows at different offsets equals the padded, masked SDPA attention the batched forward uses
otherwise. The whole-model check is tests/test_batching.py::test_packed_attention_equals_padded.
"""

from __future__ import annotations

import pytest
import torch

from omni.engine.batched_forward import attention_mask
from omni.engine.varlen_attention import (
    VarlenLayout,
    check_attn_implementation,
    reference_kernel,
    varlen_attention,
)


def test_layout_indexes_each_rows_queries_and_visible_keys():
    # row 0: 2 cached keys + 3 new; row 1: 6 cached + 1 new (a decode); width 3, kv_len 7
    layout = VarlenLayout.build([2, 6], [3, 1], width=3, kv_len=7, device=torch.device("cpu"))
    assert layout.query_index.tolist() == [0, 1, 2, 3]
    assert layout.key_index.tolist() == [0, 1, 2, 3, 4] + [7 + j for j in range(7)]
    assert layout.cu_queries.tolist() == [0, 3, 4] and layout.cu_keys.tolist() == [0, 5, 12]
    assert (layout.max_queries, layout.max_keys) == (3, 7)
    assert layout.cu_queries.dtype == torch.int32


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_packed_equals_padded_sdpa(heads, kv_heads):
    torch.manual_seed(0)
    starts, counts, dim = [0, 5, 9], [4, 1, 2], 8
    width, kv_len = max(counts), max(s + n for s, n in zip(starts, counts))
    query = torch.randn(3, heads, width, dim)
    key = torch.randn(3, kv_heads, kv_len, dim)
    value = torch.randn(3, kv_heads, kv_len, dim)
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.is_causal = True
    module.training = False
    mask = attention_mask(starts, counts, width, kv_len)
    padded, _ = varlen_attention(module, query, key, value, mask, kernel=reference_kernel, scaling=0.3)
    layout = VarlenLayout.build(starts, counts, width, kv_len, torch.device("cpu"))
    packed, _ = varlen_attention(module, query, key, value, layout, kernel=reference_kernel, scaling=0.3)
    assert packed.shape == padded.shape == (3, width, heads, dim)
    for b, n in enumerate(counts):  # padding queries differ (dropped by the forward)
        assert torch.allclose(packed[b, :n], padded[b, :n], atol=1e-6)
        assert not packed[b, n:].any()


def test_flash_attention_2_is_refused_clearly_on_the_cpu():
    check_attn_implementation("sdpa", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_attn_implementation("flash_attention_2", "cpu")
