"""Scaled dot-product attention softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, Eq. 1), the one function every
network in core calls (UNet, VAE mid-block, CLIP text encoder).

Two ways to compute the same numbers:

- ``F.scaled_dot_product_attention``: on the CPU the fused flash kernel, which never materialises the
  (B, H, Lq, Lk) probabilities. Its backward is slow on the CPU for small attentions, in bf16 several times the
  explicit form's.
- the explicit form: S = Q K^T / sqrt(d), P = softmax(S), P V, as three autograd ops. Its backward is two matrix
  products per input, but autograd keeps P for it.

The explicit form runs when autograd will need the backward on the CPU and P is at most ``MATH_MAX_BYTES``; otherwise
SDPA (always on an accelerator, where the flash backward is fast, and always without autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MATH_MAX_BYTES = 8 * 2**20
"""Largest attention-probability tensor P, B * H * Lq * Lk * element size in bytes, for which the explicit form runs
under autograd on the CPU. Above it the explicit form is no faster than SDPA (fp32) or barely (bf16), and every call
would keep one more P alive until the backward."""


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False, upcast: bool = False
) -> torch.Tensor:
    """query (B, H, Lq, d), key / value (B, H, Lk, d) -> (B, H, Lq, d).

    ``is_causal`` masks key j > query i (top-left aligned, as SDPA); ``upcast`` computes fp16 / bf16 inputs in fp32
    and returns the input dtype (SD 2.x's ``upcast_attention``).
    """
    dtype = query.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        query, key, value = query.float(), key.float(), value.float()
    if uses_math(query, key, value):
        attended = _math_attention(query, key, value, is_causal)
    else:
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal)
    return attended.to(dtype)


def uses_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """The rule: explicit form iff on the CPU, autograd records this call, and P fits in ``MATH_MAX_BYTES``."""
    if query.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    probs_bytes = query.shape[:-1].numel() * key.shape[-2] * query.element_size()
    return probs_bytes <= MATH_MAX_BYTES


def _math_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool) -> torch.Tensor:
    scores = torch.matmul(query * (1.0 / math.sqrt(query.shape[-1])), key.transpose(-2, -1))
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu_(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(-1), value)
