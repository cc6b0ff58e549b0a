"""Packed variable-length attention for the batched forward: flash-attn's kernel on CUDA.

With SDPA the batched forward pads every row to the longest and masks (batched_forward.py);
the padding costs compute in proportion to how uneven the rows are (one 512-row prefill
chunk next to fifteen 1-token decodes is 97 % padding). `attn_implementation =
"flash_attention_2"` runs the same step packed instead: each row's real queries and the keys
it may see are gathered into one sequence each, and flash-attn's varlen kernel attends
within each sequence, causal aligned to its end (a row's queries are the last of its keys).

transformers' own "flash_attention_2" cannot be used as it stands: it expects a 2-D padding
mask with queries and keys of the same length, while our rows' queries sit at different
offsets in their slots. So the model is switched to an attention function registered here;
it takes a `VarlenLayout` in place of the mask for packed steps and hands any other mask
(the static decode steps of CUDA graphs, the audio and vision encoders) to SDPA unchanged.

The kernel is a parameter so the packing is tested on the CPU with `reference_kernel`
(per-sequence SDPA, no code shared with flash-attn); flash-attn itself needs a CUDA device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# (q (Tq, H, D), k (Tk, Hkv, D), v, cu_q, cu_k, max_q, max_k, scale) -> (Tq, H, D)
VarlenKernel = Callable[..., torch.Tensor]

VARLEN = "omni_varlen"  # prefix of the registered attention functions' names


@dataclass
class VarlenLayout:
    """Where each row's real queries and visible keys are in the padded step tensors."""

    query_index: torch.Tensor  # into the flattened (B * width) queries
    key_index: torch.Tensor  # into the flattened (B * kv_len) keys
    cu_queries: torch.Tensor  # int32 (B + 1,) cumulative query counts
    cu_keys: torch.Tensor  # int32 (B + 1,)
    max_queries: int
    max_keys: int

    @classmethod
    def build(
        cls, starts: list[int], counts: list[int], width: int, kv_len: int, device: torch.device
    ) -> VarlenLayout:
        """Row b has `counts[b]` new queries after `starts[b]` cached keys."""
        query_index = [b * width + j for b, n in enumerate(counts) for j in range(n)]
        key_index = [b * kv_len + j for b, (s, n) in enumerate(zip(starts, counts)) for j in range(s + n)]
        keys = [s + n for s, n in zip(starts, counts)]
        cumulative = lambda lengths: torch.tensor(  # noqa: E731
            [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device
        )
        return cls(
            query_index=torch.tensor(query_index, device=device),
            key_index=torch.tensor(key_index, device=device),
            cu_queries=cumulative(counts),
            cu_keys=cumulative(keys),
            max_queries=max(counts),
            max_keys=max(keys),
        )


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: VarlenLayout | torch.Tensor | None,
    *,
    kernel: VarlenKernel,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, W, D), key/value
    (B, Hkv, K, D); returns (B, W, H, D) like the built-in functions."""
    if not isinstance(attention_mask, VarlenLayout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    layout = attention_mask
    batch, heads, width, dim = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], dim)  # noqa: E731  (B*len, h, D)
    q = flat(query).index_select(0, layout.query_index)
    k = flat(key).index_select(0, layout.key_index)
    v = flat(value).index_select(0, layout.key_index)
    scale = scaling if scaling is not None else dim**-0.5
    packed = kernel(
        q, k, v, layout.cu_queries, layout.cu_keys, layout.max_queries, layout.max_keys, scale
    )
    out = query.new_zeros(batch * width, heads, dim)  # padding queries: zeros, dropped later
    out.index_copy_(0, layout.query_index, packed.to(out.dtype))
    return out.view(batch, width, heads, dim), None


def flash_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        softmax_scale=scale, causal=True,  # flash-attn >= 2.1 aligns causal to the end
    )


def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> torch.Tensor:
    """The same contract in plain torch, one sequence at a time (for tests on the CPU)."""
    outputs = []
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)  # (H, n, D)
        ks = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1)
        vs = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1)
        n, total = qs.shape[1], ks.shape[1]
        visible = torch.arange(total)[None, :] <= torch.arange(total - n, total)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=visible.to(q.device), scale=scale, enable_gqa=True
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def use_varlen_attention(model: PreTrainedModel, kernel: VarlenKernel) -> None:
    """Switch `model` (and its submodules) to packed attention with `kernel`."""
    name = f"{VARLEN}_{kernel.__name__}"
    AttentionInterface.register(name, partial(varlen_attention, kernel=kernel))
    model.set_attn_implementation(name)


def is_varlen(config) -> bool:
    return str(getattr(config, "_attn_implementation", "")).startswith(VARLEN)


def check_attn_implementation(name: str, device: str | torch.device) -> None:
    """Fail before any model loads when the chosen kernel can't run here."""
    if name != "flash_attention_2":
        return
    if torch.device(device).type != "cuda":
        raise ValueError(f"attn_implementation=flash_attention_2 needs a CUDA device, not {device}")
    try:
        import flash_attn  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            "attn_implementation=flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn --no-build-isolation), or use sdpa"
        ) from exc


def set_attn_implementation(model: PreTrainedModel, name: str, device: str | torch.device) -> None:
    """A worker's model on the configured kernel: sdpa, eager, or flash-attn packed."""
    check_attn_implementation(name, device)
    if name == "flash_attention_2":
        use_varlen_attention(model, flash_kernel)
    else:
        model.set_attn_implementation(name)
