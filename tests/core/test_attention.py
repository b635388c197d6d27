"""core.attention: the explicit form and SDPA give the same outputs and gradients, and the rule picks the form."""

import pytest
import torch
import torch.nn.functional as F

from fixative.core import attention as attention_module
from fixative.core.attention import MATH_MAX_BYTES, _math_attention, attention, uses_math

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _inputs(dtype, query_len=48, key_len=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((2, 3, query_len, 16), (2, 3, key_len, 16), (2, 3, key_len, 16))
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def _output_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [tensor.grad for tensor in inputs]


@pytest.mark.parametrize("is_causal, key_len", [(False, 48), (False, 11), (True, 48)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_math_form_matches_sdpa_in_output_and_gradients(is_causal, key_len, dtype, tol):
    grad_out = torch.randn(2, 3, 48, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = _output_and_grads(
        lambda q, k, v: _math_attention(q, k, v, is_causal), _inputs(dtype, key_len=key_len), grad_out
    )
    reference = _output_and_grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
        _inputs(dtype, key_len=key_len),
        grad_out,
    )
    for name, mine, theirs in zip(("output", "dQ", "dK", "dV"), ours, reference):
        scale = theirs.abs().max().item()
        error = (mine.double() - theirs.double()).abs().max().item()
        assert error <= tol * scale, f"{name}: {error} > {tol} * {scale}"


def test_rule_takes_the_math_form_only_under_autograd_on_the_cpu_below_the_bound():
    query, key, value = _inputs(torch.float32)
    assert uses_math(query, key, value)
    with torch.no_grad():
        assert not uses_math(query, key, value)
    detached = [t.detach() for t in (query, key, value)]
    assert not uses_math(*detached)
    # a gradient to any one input is enough
    assert uses_math(detached[0], detached[1], value)
    # P of 2 * 3 * 48 * 48 fp32 = 55 KiB: over a bound of 54 KiB, under one of 55 KiB
    probs_bytes = 2 * 3 * 48 * 48 * 4
    attention_module.MATH_MAX_BYTES, saved = probs_bytes - 1, MATH_MAX_BYTES
    try:
        assert not uses_math(query, key, value)
        attention_module.MATH_MAX_BYTES = probs_bytes
        assert uses_math(query, key, value)
    finally:
        attention_module.MATH_MAX_BYTES = saved
    meta = [torch.empty(t.shape, device="meta", requires_grad=True) for t in (query, key, value)]
    assert not uses_math(*meta)  # any device but the CPU keeps SDPA


def test_attention_dispatches_by_the_rule():
    query, key, value = _inputs(torch.float32)
    assert "ScaledDotProduct" not in type(attention(query, key, value).grad_fn).__name__
    big = [torch.randn(1, 8, 1024, 8, requires_grad=True) for _ in range(3)]  # P is 32 MiB in fp32
    assert "ScaledDotProduct" in type(attention(*big).grad_fn).__name__
    with torch.no_grad():
        assert attention(query, key, value).grad_fn is None
        torch.testing.assert_close(
            attention(query, key, value), F.scaled_dot_product_attention(query, key, value), rtol=0, atol=0
        )


def test_upcast_computes_in_fp32_and_returns_the_input_dtype():
    query, key, value = _inputs(torch.bfloat16)
    out = attention(query, key, value, upcast=True)
    assert out.dtype == torch.bfloat16
    expected = _math_attention(query.float(), key.float(), value.float(), False).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
