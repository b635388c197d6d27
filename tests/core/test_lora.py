"""LoRA adapters: training only them, merging, and the files (ours and kohya-style) against diffusers."""

import torch
from torch import nn

from fixative.core.lora import LoRALinear, inject_lora, merge_lora


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
