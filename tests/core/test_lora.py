"""LoRA adapters: training only them, merging, and the files (ours and kohya-style) against diffusers."""

import pytest
import torch
from torch import nn

from fixative.core.lora import LoRAConv2d, LoRALinear, inject_lora, lora_state_dict, merge_lora


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (
            nn.Linear(8, 8, bias=False),
            nn.Linear(8, 8, bias=False),
            nn.Linear(8, 8, bias=False),
        )
        self.to_out = nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.0)])
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
        return self.other(self.to_out[0](attention @ v))


def test_lora_starts_as_identity_and_merges_exactly():
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(2, 5, 8)
    before = model(x)
    keys = set(model.state_dict())
    model.requires_grad_(False)
    params = inject_lora(model, rank=2, alpha=4)
    assert len(params) == 8  # down and up of to_q, to_k, to_v, to_out.0; "other" untouched
    assert isinstance(model.to_out[0], LoRALinear) and type(model.other) is nn.Linear
    assert torch.equal(model(x), before)  # B = 0 at start
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    with torch.no_grad():
        for p in params:
            p.normal_()
    adapted = model(x)
    assert (adapted - before).abs().max() > 1e-2
    assert merge_lora(model) == 4
    assert set(model.state_dict()) == keys
    merged = model(x)
    assert (merged - adapted).abs().max() <= 1e-5 * max(1, adapted.abs().max())


class Convolutions(nn.Module):
    def __init__(self, stride: int, padding: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, kernel, stride=stride, padding=padding)
        self.conv_shortcut = nn.Conv2d(6, 5, 1, bias=False)
        self.other = nn.Conv2d(5, 5, 3, padding=1)

    def forward(self, x):
        return self.other(self.conv_shortcut(self.conv1(x)))


@pytest.mark.parametrize("stride, padding, kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_conv_lora_starts_as_identity_and_merges_exactly(stride, padding, kernel):
    torch.manual_seed(0)
    model = Convolutions(stride, padding, kernel)
    x = torch.randn(2, 3, 9, 9)
    before = model(x)
    keys = set(model.state_dict())
    model.requires_grad_(False)
    params = inject_lora(model, rank=2, alpha=3, targets=("conv1", "conv_shortcut"))
    assert len(params) == 4 and type(model.other) is nn.Conv2d
    assert isinstance(model.conv1, LoRAConv2d) and isinstance(model.conv_shortcut, LoRAConv2d)
    assert torch.equal(model(x), before)  # B = 0 at start
    with torch.no_grad():
        for p in params:
            p.normal_()
    adapted = model(x)
    assert (adapted - before).abs().max() > 1e-2
    # peft's layout: A (r, in, k, k), B (out, r, 1, 1), with alpha / r folded into B
    state = lora_state_dict({"unet": model})
    assert state["unet.conv1.lora_A.weight"].shape == (2, 3, kernel, kernel)
    assert state["unet.conv1.lora_B.weight"].shape == (6, 2, 1, 1)
    assert torch.equal(state["unet.conv1.lora_B.weight"], 1.5 * model.conv1.lora_up.weight)
    assert merge_lora(model) == 2
    assert set(model.state_dict()) == keys and type(model.conv1) is nn.Conv2d
    merged = model(x)
    assert (merged - adapted).abs().max() <= 1e-5 * max(1, adapted.abs().max())


def test_lora_trains_only_the_adapters():
    torch.manual_seed(0)
    model = Attention()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False)
    params = inject_lora(model, rank=2)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    x, target = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
