"""The denoising UNet of Stable Diffusion 1.x / 2.x (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", LDM below).

The network predicts the noise (or v, or the clean sample) of noisy latents z_t given the timestep t
and the text embeddings tau(y) (LDM Sec. 3.3). Module attribute paths equal diffusers' state-dict keys
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``), so a diffusers ``unet/``
folder loads with ``load_state_dict(strict=True)`` and diffusers loads what we save.

Layout, for block widths (c0, c1, ..., cN):
  conv_in -> down blocks (ResNets [+ transformers], stride-2 conv except the last)
          -> mid block (ResNet, transformer, ResNet)
          -> up blocks (ResNets on [h, skip] [+ transformers], nearest x2 + conv except the last)
          -> GroupNorm, SiLU, conv_out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .config import UNetConfig, check_buildable, unet_problems
from .layout import Conv2d, working_layout
from .lora import LoRAConv2d
from .upsampling import upsample_nearest2x_conv


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (DDPM / "Attention is all you need").

    frequency_i = max_period ** (-i / (dim / 2 - freq_shift)), embedding = [sin(t f), cos(t f)]
    (or [cos, sin] when flip_sin_to_cos, as SD was trained).
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * -math.log(max_period)
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = timesteps.float()[:, None] * frequencies[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    embedding = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(embedding, (0, dim % 2))


def _maybe_checkpoint(module: nn.Module, enabled: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """module(*args), recomputed in the backward pass when gradient checkpointing is on and training."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1, SiLU, linear_2 (widths c0 -> 4 c0 -> 4 c0).

    ``cond_proj`` embeds an extra condition added to the sinusoidal embedding before the MLP: the
    guidance-scale embedding w of latent consistency models (LCM, Luo et al. 2023, Sec. 4.2).
    """

    def __init__(self, in_features: int, time_embed_dim: int, cond_proj_dim: int | None):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_features, bias=False) if cond_proj_dim is not None else None

    def forward(self, sinusoidal: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sinusoidal = sinusoidal + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(sinusoidal)))


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, conv3x3, + projected time embedding, GroupNorm, SiLU, conv3x3, + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, hidden: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        """hidden (B, C_in, h, w); time_features (B, time_embed_dim), the time embedding after SiLU."""
        # in-place activations and additions write into tensors just created here (none is needed by
        # autograd unchanged): fewer large allocations, which cost page faults on the CPU
        residual = hidden if self.conv_shortcut is None else self.conv_shortcut(hidden)
        hidden = self.conv1(F.silu(self.norm1(hidden), inplace=True))
        hidden += self.time_emb_proj(time_features)[:, :, None, None]
        hidden = F.silu(self.norm2(hidden), inplace=True)  # a statement of its own: conv1's output is freed here,
        hidden = self.conv2(hidden)  # before conv2 allocates (one activation fewer alive at the peak)
        return hidden.add_(residual)


class Attention(nn.Module):
    """Multi-head (cross-)attention softmax(Q K^T / sqrt(d)) V (LDM Sec. 3.3).

    Q = to_q(x); K, V = to_k(context), to_v(context) with context = x for self-attention or the text
    embeddings for cross-attention.
    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast  # SD 2.1: scores in fp32 when the model runs in fp16 / bf16
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, L, C); context (B, S, context_dim) or None -> (B, L, C)."""
        context = hidden if context is None else context
        # (B, L, C) -> (B, heads, L, C / heads)
        query, key, value = (
            projection(source).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for projection, source in ((self.to_q, hidden), (self.to_k, context), (self.to_v, context))
        )
        attended = attention(query, key, value, upcast=self.upcast)
        return self.to_out[0](attended.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): h * gelu(g) with [h, g] = proj(x)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(hidden).chunk(2, dim=-1)
        return F.gelu(gate).mul_(hidden)


class FeedForward(nn.Module):
    """GEGLU to 4x width, then back. ``net.1`` is diffusers' (parameter-free) dropout slot, kept as an
    identity so that the output layer's key stays ``ff.net.2``."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](hidden))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, hidden: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        # residual connections, added in place into each sub-layer's fresh output
        hidden = self.attn1(self.norm1(hidden)).add_(hidden)
        hidden = self.attn2(self.norm2(hidden), text_embeddings).add_(hidden)
        return self.ff(self.norm3(hidden)).add_(hidden)


class Transformer2DModel(nn.Module):
    """Spatial transformer (LDM Sec. 3.3): the feature map, flattened to h*w tokens, attends to itself and
    to the text embeddings tau(y); the result is added back to the input."""

    def __init__(self, channels: int, heads: int, config: UNetConfig):
        super().__init__()
        self.use_linear_projection = config.use_linear_projection
        self.gradient_checkpointing = False
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        # SD 1.x: 1x1 convolutions; SD 2.x: Linear layers (same maths, different weight shapes)
        projection = nn.Linear if config.use_linear_projection else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = projection(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, config.cross_attention_dim, config.upcast_attention)
            for _ in range(config.transformer_layers_per_block)
        )
        self.proj_out = projection(channels, channels)

    def _project(self, layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        # a 1x1 convolution is a Linear layer on the channels; apply it to tokens, with no layout change
        if self.use_linear_projection:
            return layer(tokens)
        if isinstance(layer, LoRAConv2d):  # an adapted convolution computes more than its weight
            return layer(tokens.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return F.linear(tokens, layer.weight.flatten(1), layer.bias)

    def forward(self, hidden: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = hidden.shape
        tokens = self.norm(hidden).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        tokens = self._project(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = _maybe_checkpoint(block, self.gradient_checkpointing, tokens, text_embeddings)
        tokens = self._project(self.proj_out, tokens)
        # residual first: the sum is then laid out like `hidden` (channels-first or channels-last, as the
        # convolutions downstream expect); a transpose of the tokens happens inside the addition if any
        return hidden + tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden: torch.Tensor, size: torch.Size) -> torch.Tensor:
        # nearest x2 (to the size of the next skip connection, so odd latent sizes work); an exact doubling
        # is computed without the up-sampled image (upsampling.py: 16 instead of 36 multiply-adds per pixel)
        if tuple(size) == (2 * hidden.shape[-2], 2 * hidden.shape[-1]):
            return upsample_nearest2x_conv(hidden, self.conv)
        return self.conv(F.interpolate(hidden, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """``layers_per_block`` ResNets, each followed by a transformer when the block has cross-attention,
    then a stride-2 convolution unless it is the last block. Returns the output and its skip connections."""

    def __init__(
        self, in_channels: int, out_channels: int, heads: int, attention: bool, downsample: bool, config: UNetConfig
    ):
        super().__init__()
        self.gradient_checkpointing = False
        groups, eps, time_dim = config.norm_num_groups, config.norm_eps, config.time_embed_dim
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, time_dim, groups, eps)
            for i in range(config.layers_per_block)
        )
        self.attentions = (
            nn.ModuleList(Transformer2DModel(out_channels, heads, config) for _ in self.resnets) if attention else None
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(
        self, hidden: torch.Tensor, time_features: torch.Tensor, text_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden = _maybe_checkpoint(resnet, self.gradient_checkpointing, hidden, time_features)
            if self.attentions is not None:
                hidden = self.attentions[i](hidden, text_embeddings)
            skips.append(hidden)
        if self.downsamplers is not None:
            hidden = self.downsamplers[0](hidden)
            skips.append(hidden)
        return hidden, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResNet, transformer, ResNet at the lowest resolution."""

    def __init__(self, channels: int, heads: int, config: UNetConfig):
        super().__init__()
        self.gradient_checkpointing = False
        groups, eps, time_dim = config.norm_num_groups, config.norm_eps, config.time_embed_dim
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, time_dim, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, config)])

    def forward(self, hidden: torch.Tensor, time_features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        hidden = _maybe_checkpoint(self.resnets[0], self.gradient_checkpointing, hidden, time_features)
        hidden = self.attentions[0](hidden, text_embeddings)
        return _maybe_checkpoint(self.resnets[1], self.gradient_checkpointing, hidden, time_features)


class UpBlock(nn.Module):
    """``layers_per_block + 1`` ResNets, each on [hidden, skip] concatenated along channels (the skips of
    the mirrored down block, last first), each followed by a transformer when the mirrored down block has
    cross-attention; then nearest x2 + conv unless it is the last block.

    in_channels: width of the mirrored down block's input (its first skip); prev_channels: width of the
    hidden state coming from below.
    """

    def __init__(
        self,
        in_channels: int,
        prev_channels: int,
        out_channels: int,
        heads: int,
        attention: bool,
        upsample: bool,
        config: UNetConfig,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        groups, eps, time_dim = config.norm_num_groups, config.norm_eps, config.time_embed_dim
        n = config.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (prev_channels if i == 0 else out_channels) + (in_channels if i == n - 1 else out_channels),
                out_channels,
                time_dim,
                groups,
                eps,
            )
            for i in range(n)
        )
        self.attentions = (
            nn.ModuleList(Transformer2DModel(out_channels, heads, config) for _ in self.resnets) if attention else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(
        self,
        hidden: torch.Tensor,
        skips: list[torch.Tensor],
        time_features: torch.Tensor,
        text_embeddings: torch.Tensor,
        upsample_size: torch.Size | None,
    ) -> torch.Tensor:
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            hidden = torch.cat([hidden, skip], dim=1)
            hidden = _maybe_checkpoint(resnet, self.gradient_checkpointing, hidden, time_features)
            if self.attentions is not None:
                hidden = self.attentions[i](hidden, text_embeddings)
        if self.upsamplers is not None:
            hidden = self.upsamplers[0](hidden, upsample_size)
        return hidden


class UNet2DConditionModel(nn.Module):
    """epsilon_theta(z_t, t, tau(y)) of LDM Eq. 3 (or v / sample, whatever the weights were trained for).

    Keeps no packed convolution weights unless ``layout.enable_weight_packing(unet, True)``: for SD 1.5 they
    would hold 1.1 GB (bf16) beside activations of a few hundred MB, for a few per cent of speed in bf16."""

    pack_weight = False  # layout.enable_weight_packing: channels-last bf16 inference with packed weights

    def __init__(self, config: UNetConfig):
        super().__init__()
        check_buildable(unet_problems(config))
        self.config = config
        widths = config.block_out_channels
        last = len(widths) - 1
        self.conv_in = Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], config.time_embed_dim, config.time_cond_proj_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                widths[max(i - 1, 0)],
                widths[i],
                config.num_heads[i],
                config.cross_attention_blocks[i],
                downsample=i < last,
                config=config,
            )
            for i in range(len(widths))
        )
        self.mid_block = UNetMidBlock2DCrossAttn(widths[-1], config.num_heads[-1], config)
        # up block j mirrors down block i = last - j
        self.up_blocks = nn.ModuleList(
            UpBlock(
                widths[max(i - 1, 0)],
                widths[min(i + 1, last)],
                widths[i],
                config.num_heads[i],
                config.cross_attention_blocks[i],
                upsample=i > 0,
                config=config,
            )
            for i in reversed(range(len(widths)))
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, widths[0], eps=config.norm_eps)
        self.conv_out = Conv2d(widths[0], config.out_channels, 3, padding=1)

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResNet and transformer-layer activations in the backward pass (training only)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        text_embeddings: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latents (B, in_channels, h, w); timesteps a number, 0-d or (B,) tensor; text_embeddings
        (B, 77, cross_attention_dim); timestep_cond (B, time_cond_proj_dim) or None -> (B, out_channels, h, w)."""
        config = self.config
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        sinusoidal = timestep_embedding(
            timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift
        )
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(latents.dtype)
        time_embedding = self.time_embedding(sinusoidal.to(latents.dtype), timestep_cond)
        # every ResNet applies SiLU before projecting the time embedding: do it once here
        time_features = F.silu(time_embedding)

        # channels-first by default; with weight packing turned on (layout.enable_weight_packing), bf16 inference
        # on the CPU runs channels-last with packed convolution weights, the convolutions' fastest form there
        # (without packing, oneDNN's per-call weight reorders make channels-last slower than channels-first at
        # 8x8 and 16x16; in fp32 both forms are equally fast)
        packed = latents.dtype == torch.bfloat16 and self.pack_weight
        hidden = self.conv_in(working_layout(latents, self) if packed else latents)
        skips = [hidden]
        for block in self.down_blocks:
            hidden, block_skips = block(hidden, time_features, text_embeddings)
            skips.extend(block_skips)
        hidden = self.mid_block(hidden, time_features, text_embeddings)
        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets) :]
            del skips[-len(block.resnets) :]
            hidden = block(hidden, block_skips, time_features, text_embeddings, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(hidden), inplace=True)).contiguous()
