"""The CLIP text transformer that turns prompt tokens into the UNet's ``text_embeddings``.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", Sec. 2.4:
a causal (GPT-2 style) pre-LayerNorm transformer over at most 77 tokens. SD 1.x uses OpenAI's
ViT-L/14 text tower; SD 2.x uses OpenCLIP ViT-H/14's (see ``CLIPTextConfig``).

Attribute paths equal the released Stable Diffusion key names (``text_model.encoder.layers.0.self_attn.q_proj.weight``),
so a diffusers ``text_encoder/`` loads with ``load_state_dict(strict=True)``; ``checkpoints.load_model`` renames
the other layouts on the way in (``single_file.map_clip_key``: files without the ``text_model.`` prefix, which
transformers >= 5.6 writes, and the ``position_ids`` buffer of older ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import CLIPTextConfig, check_buildable, text_encoder_problems
from .errors import FixativeError


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor  # (batch, tokens, hidden_size): the UNet's text_embeddings
    pooled_output: torch.Tensor  # (batch, hidden_size): final-normed last layer at the EOS token


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, Sec. 2)
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        num_tokens = input_ids.shape[-1]
        if num_tokens > self.position_embedding.num_embeddings:
            raise FixativeError(
                f"{num_tokens} tokens given but the text encoder has {self.position_embedding.num_embeddings} "
                "positions; tokenize with the model's tokenizer, which truncates"
            )
        # learned absolute positions 0 .. num_tokens-1, added to the token embeddings
        return self.token_embedding(input_ids) + self.position_embedding.weight[:num_tokens]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (batch, heads, tokens, head_dim)
            return x.view(batch, tokens, self.num_heads, -1).transpose(1, 2)

        q, k, v = (heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # softmax(q k^T / sqrt(head_dim) + causal mask) v: each token sees itself and the tokens before it
        attended = attention(q, k, v, is_causal=True)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """``forward(input_ids (batch, tokens), clip_skip=0) -> CLIPTextOutput``."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        check_buildable(text_encoder_problems(config))
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0) -> CLIPTextOutput:
        """``clip_skip=k`` returns the hidden state after layer ``num_hidden_layers - k``, passed through the
        final layer norm (diffusers' convention: 1 = the penultimate layer, as NovelAI / A1111 "clip skip 2")."""
        num_layers = self.config.num_hidden_layers
        if not 0 <= clip_skip < num_layers:
            raise FixativeError(f"clip_skip={clip_skip} is out of range; use 0 .. {num_layers - 1}")
        model = self.text_model
        hidden_states = model.embeddings(input_ids)  # (batch, tokens, hidden_size)
        skipped_states = None
        for index, layer in enumerate(model.encoder.layers, start=1):
            hidden_states = layer(hidden_states)
            if index == num_layers - clip_skip:
                skipped_states = hidden_states
        last_hidden_state = model.final_layer_norm(skipped_states)
        final_states = last_hidden_state if clip_skip == 0 else model.final_layer_norm(hidden_states)
        pooled_output = final_states[torch.arange(len(input_ids)), self.eos_positions(input_ids)]
        return CLIPTextOutput(last_hidden_state, pooled_output)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch,) index of the token whose state is the pooled output."""
        if self.config.eos_token_id == 2:
            # legacy configs: EOS (49407) is the largest id of the CLIP vocabulary; argmax returns its first position
            return input_ids.argmax(dim=-1)
        # the first EOS (padding may repeat it); transformers' rule since its PR #24773
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
