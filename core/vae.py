"""The KL autoencoder of Stable Diffusion 1.x / 2.x (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", Sec. 3.1 and App. G).

Pixels in [-1, 1] are encoded into a diagonal Gaussian over *unscaled* latents (8x smaller for the SD
config, 4 channels); the decoder maps latents back to pixels. The UNet works on latents multiplied by
``config.scaling_factor``: callers scale, this module never does.

Attribute paths equal diffusers' state-dict keys (``encoder.down_blocks.0.resnets.0.conv1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ...), so a diffusers ``vae/`` folder loads with
``load_state_dict(strict=True)``. Tiled encoding/decoding follows diffusers' ``AutoencoderKL.tiled_encode``
/ ``tiled_decode`` exactly, so both tools give the same result on large images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import AutoencoderKLConfig, check_buildable, vae_problems
from .errors import FixativeError
from .layout import Conv2d, working_layout
from .noise import randn_tensor
from .upsampling import upsample_nearest2x_conv

NORM_EPS = 1e-6  # every GroupNorm of the SD autoencoder (LDM's Normalize uses eps=1e-6)


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(var)) over unscaled latents (LDM App. G)."""

    def __init__(self, moments: torch.Tensor):
        # moments: (batch, 2 * latent_channels, h, w), mean then log-variance along channels
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite, as LDM and diffusers do
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick, differentiable in mean and std)."""
        noise = randn_tensor(tuple(self.mean.shape), generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar) over channels and space; shape (batch,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1-projected where widths differ) shortcut (diffusers' ResnetBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.silu(self.norm1(x), inplace=True))
        hidden = F.silu(self.norm2(hidden), inplace=True)  # a statement of its own: conv1's output is freed here,
        hidden = self.conv2(hidden)  # before conv2 allocates (one activation fewer alive at the peak)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return hidden.add_(shortcut)  # in place on the conv output: autograd does not need it


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling, then a 3x3 conv (``self.conv``, stored as trained), computed as
    four 2x2 convolutions of the input (``upsampling.upsample_nearest2x_conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_nearest2x_conv(x, self.conv)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the h*w positions, channels as the feature axis, with a residual
    (LDM's AttnBlock; diffusers' mid-block ``Attention`` with its Linear projections)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (batch, h*w, C); a free view when x is channels-last
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        query, key, value = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        # softmax(q k^T / sqrt(C)) v, one head of width C
        attended = attention(query, key, value).squeeze(1)
        out = self.to_out[0](attended).view(batch, height, width, channels).permute(0, 3, 1, 2)
        return x + out  # keeps x's memory format


class MidBlock(nn.Module):
    """ResNet, self-attention, ResNet at the lowest resolution (attention dropped when disabled)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention_layer in self.attentions:
            x = attention_layer(x)
        return self.resnets[1](x)


def _resnets(in_channels: int, out_channels: int, count: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(count)
    )


class EncoderBlock(nn.Module):
    """ResNets at one resolution, then a 2x down-sampling except in the last block (DownEncoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """ResNets at one resolution, then a 2x up-sampling except in the last block (UpDecoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    """pixels (B, 3, H, W) -> moments (B, 2 * latent_channels, H / f, W / f), before quant_conv."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(widths[max(i - 1, 0)], width, config.layers_per_block, groups, downsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixels)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class Decoder(nn.Module):
    """latents (B, latent_channels, h, w), after post_quant_conv -> pixels (B, 3, h * f, w * f)."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        # the decoder has one more ResNet per block than the encoder (LDM: num_res_blocks + 1)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(
                widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups, upsample=i < len(widths) - 1
            )
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


def _blend(previous: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first ``extent`` rows (dim=2) or columns (dim=3) of ``tile`` from the last ones of
    ``previous``: out[y] = previous[-extent + y] * (1 - y / extent) + tile[y] * (y / extent)."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return tile
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    ramp = (torch.arange(extent, dtype=torch.float64) / extent).view(
        shape
    )  # y / extent, rounded once as diffusers does
    head = previous.narrow(dim, previous.shape[dim] - extent, extent) * (1 - ramp).to(
        tile.device, tile.dtype
    ) + tile.narrow(dim, 0, extent) * ramp.to(tile.device, tile.dtype)
    return torch.cat([head, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim=dim)


def _tiled(inputs: torch.Tensor, fn, in_tile: int, out_tile: int, overlap: float) -> torch.Tensor:
    """Run ``fn`` on overlapping square tiles of ``inputs`` and stitch the outputs (diffusers' algorithm).

    Input tiles of side ``in_tile`` start every ``in_tile * (1 - overlap)``; each output tile (side
    ``out_tile``) is blended with the already-blended tile above and to its left over
    ``out_tile * overlap`` rows/columns, then cropped to ``out_tile - blend`` and concatenated.
    """
    stride = int(in_tile * (1 - overlap))
    blend = int(out_tile * overlap)
    keep = out_tile - blend
    starts_y = range(0, inputs.shape[2], stride)
    starts_x = range(0, inputs.shape[3], stride)
    rows: list[list[torch.Tensor]] = []
    for i, y in enumerate(starts_y):
        row: list[torch.Tensor] = []
        for j, x in enumerate(starts_x):
            tile = fn(inputs[:, :, y : y + in_tile, x : x + in_tile])
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend, dim=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend, dim=3)
            row.append(tile)
        rows.append(row)
    return torch.cat([torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3) for row in rows], dim=2)


class AutoencoderKL(nn.Module):
    """The SD 1.x / 2.x VAE: ``encode`` pixels in [-1, 1] to a posterior over unscaled latents, ``decode``
    unscaled latents to pixels in [-1, 1]. Inputs are cast to the model's dtype."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        check_buildable(vae_problems(config))
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)
        self.use_slicing = False
        self.use_tiling = False
        self.tile_size = config.sample_size  # pixels
        self.tile_overlap = 0.25

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def latent_tile_size(self) -> int:
        return int(self.tile_size / self.config.downsampling_factor)

    def enable_tiling(self, tile_size: int | None = None, overlap: float = 0.25) -> None:
        """Encode/decode images larger than ``tile_size`` pixels (default: config.sample_size) tile by tile,
        blending ``overlap`` of each tile into its neighbours: memory stays that of one tile."""
        tile_size = self.config.sample_size if tile_size is None else tile_size
        if tile_size < self.config.downsampling_factor or not 0.0 <= overlap < 1.0:
            raise FixativeError(
                f"tiling needs tile_size >= {self.config.downsampling_factor} pixels and "
                f"0 <= overlap < 1; got tile_size={tile_size}, overlap={overlap}"
            )
        self.use_tiling, self.tile_size, self.tile_overlap = True, tile_size, overlap

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode/decode a batch one image at a time (same result, lower peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(pixels.shape[-2:]) > self.tile_size:
            return _tiled(pixels, self._encode_tile, self.tile_size, self.latent_tile_size, self.tile_overlap)
        return self._encode_tile(pixels)

    def _encode_tile(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(working_layout(pixels, self))).contiguous()

    def _decode_tile(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(working_layout(latents, self))).contiguous()

    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(latents.shape[-2:]) > self.latent_tile_size:
            return _tiled(latents, self._decode_tile, self.latent_tile_size, self.tile_size, self.tile_overlap)
        return self._decode_tile(latents)

    def _per_slice(self, fn, inputs: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and inputs.shape[0] > 1:
            return torch.cat([fn(item) for item in inputs.split(1)])
        return fn(inputs)

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussian:
        """pixels (B, in_channels, H, W) in [-1, 1] -> posterior over unscaled latents (B, C, H / f, W / f)."""
        return DiagonalGaussian(self._per_slice(self._moments, pixels.to(self.dtype)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> pixels (B, out_channels, h * f, w * f), about [-1, 1]."""
        return self._per_slice(self._pixels, latents.to(self.dtype))

    def forward(
        self, pixels: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reconstruction: decode(z) with z the posterior's mean, or a sample of it."""
        posterior = self.encode(pixels)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents)
