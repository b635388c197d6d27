"""conv3x3(nearest x2) as four 2x2 convolutions, with the folded weight cached while the weight is unchanged."""

import torch
import torch.nn.functional as F

from fixative.core.layout import Conv2d
from fixative.core.upsampling import _phase_weight, upsample_nearest2x_conv


def reference(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert (out - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_cached_fold_follows_in_place_weight_updates_and_serves_input_gradients():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 6, 5, 7)
    with torch.inference_mode():
        assert_matches(upsample_nearest2x_conv(x, conv), reference(x, conv))
    conv.weight.mul_(-2.0)  # e.g. an optimizer step or load_state_dict
    assert_matches(upsample_nearest2x_conv(x, conv), reference(x, conv))
    # the weight folded under inference_mode is a normal tensor: autograd can save it for the backward pass
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(2, 6, 10, 14)
    (ours_grad,) = torch.autograd.grad(upsample_nearest2x_conv(ours_x, conv), ours_x, grad_out)
    (ref_grad,) = torch.autograd.grad(reference(ref_x, conv), ref_x, grad_out)
    assert_matches(ours_grad, ref_grad)


def test_weight_gradients_flow_through_the_fold_uncached():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    upsample_nearest2x_conv(x, conv).square().sum().backward()
    ours_grad, conv.weight.grad = conv.weight.grad, None
    reference(x, conv).square().sum().backward()
    assert_matches(ours_grad, conv.weight.grad)
    assert not hasattr(conv, "_phase_weight_cache")


def test_phase_weights_are_the_summed_taps_and_the_plain_fold_keeps_nothing_on_the_module():
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 3, 3)
    # phase (1, 0): output row 2i+1 reads kernel rows (0+1, 2), output column 2j reads kernel columns (0, 1+2)
    expected = torch.stack(
        [
            torch.stack(
                [weight[:, :, 0, 0] + weight[:, :, 1, 0], weight[:, :, 0, 1:].sum(-1) + weight[:, :, 1, 1:].sum(-1)], -1
            ),
            torch.stack([weight[:, :, 2, 0], weight[:, :, 2, 1:].sum(-1)], -1),
        ],
        -2,
    )
    torch.testing.assert_close(_phase_weight(weight, 1, 0), expected)
    conv = Conv2d(6, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        assert_matches(upsample_nearest2x_conv(x, conv), reference(x, conv))  # channels-first: folded per call
        assert getattr(conv, "_phase_weight_cache", None) is None
        channels_last = x.contiguous(memory_format=torch.channels_last)
        out = upsample_nearest2x_conv(channels_last, conv)  # channels-last: one packed convolution, kept
        assert_matches(out, reference(x, conv))
        assert out.is_contiguous(memory_format=torch.channels_last) and conv._phase_weight_cache is not None
        conv.weight.mul_(-1.0)
        assert_matches(upsample_nearest2x_conv(channels_last, conv), reference(x, conv))  # repacked
        upsample_nearest2x_conv(x, conv)
    assert conv._phase_weight_cache is None  # a call that does not pack drops the packed copy
