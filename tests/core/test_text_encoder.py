"""Parity of fixative's CLIP text transformer with transformers' CLIPTextModel on the same random weights."""

import dataclasses

import pytest
import torch
import transformers
from parity import assert_close

from fixative.core.config import CLIPTextConfig
from fixative.core.errors import FixativeError
from fixative.core.single_file import map_clip_key
from fixative.core.text_encoder import CLIPTextModel

BOS, EOS, EXCLAMATION = 49406, 49407, 0  # "!" is id 0: SD 2.x pads with it

SD1_SMALL = CLIPTextConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="quick_gelu",
    projection_dim=64,
)
SD2_SMALL = dataclasses.replace(SD1_SMALL, hidden_act="gelu", num_hidden_layers=4)


def loadable(state_dict: dict) -> dict:
    """A transformers state dict under our keys, renamed as load_model renames a text_encoder/ folder's."""
    return {ours: value for key, tensor in state_dict.items() for ours, value in map_clip_key(key, tensor)}


def reference_and_ours(config: CLIPTextConfig) -> tuple[torch.nn.Module, CLIPTextModel]:
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_diffusers())).eval()
    # randomise the layer norms too, so a swapped or missing one cannot go unnoticed
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            if "layer_norm" in name:
                tensor.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    ours = CLIPTextModel(config).eval()
    ours.load_state_dict(loadable(reference.state_dict()), strict=True)
    return reference, ours


def prompt_ids(batch: int, pad_id: int, lengths: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """(batch, 77) BOS, random tokens, EOS, then padding, as the tokenizer lays them out."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), pad_id, dtype=torch.long)
    for row, length in zip(range(batch), lengths):
        ids[row, 0] = BOS
        ids[row, 1 : length + 1] = torch.randint(1, 49400, (length,), generator=generator)
        ids[row, length + 1] = EOS
    return ids


def test_state_dict_uses_released_sd_keys_without_position_ids():
    keys = set(CLIPTextModel(SD1_SMALL).state_dict())
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.embeddings.position_embedding.weight" in keys
    assert "text_model.encoder.layers.2.self_attn.q_proj.weight" in keys
    assert "text_model.encoder.layers.2.mlp.fc2.bias" in keys
    assert "text_model.final_layer_norm.weight" in keys
    assert not any("position_ids" in key for key in keys)
    assert all(key.startswith("text_model.") for key in keys)


def test_loading_adds_the_text_model_prefix_and_drops_position_ids():
    tensor = torch.zeros(1)
    mapped = loadable(
        {
            "encoder.layers.0.mlp.fc1.weight": tensor,
            "text_model.final_layer_norm.bias": tensor,
            "text_model.embeddings.position_ids": tensor,
            "embeddings.position_ids": tensor,
        }
    )
    assert set(mapped) == {"text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.bias"}


@pytest.mark.parametrize("config", [SD1_SMALL, SD2_SMALL], ids=["sd1-quick_gelu", "sd2-gelu"])
@pytest.mark.parametrize("pad_id", [EOS, EXCLAMATION], ids=["pad-eos", "pad-exclamation"])
def test_matches_transformers_last_hidden_state_and_pooled_output(config, pad_id):
    reference, ours = reference_and_ours(config)
    input_ids = prompt_ids(3, pad_id, lengths=(5, 20, 75))
    with torch.no_grad():
        expected = reference(input_ids)
        output = ours(input_ids)
    assert_close(output.last_hidden_state, expected.last_hidden_state)
    assert_close(output.pooled_output, expected.pooler_output)
    # the pooled output is the state at the first EOS, not at the padding after it
    assert torch.equal(output.pooled_output[0], output.last_hidden_state[0, 6])


@pytest.mark.parametrize("config", [SD1_SMALL, SD2_SMALL], ids=["sd1-quick_gelu", "sd2-gelu"])
def test_clip_skip_one_is_penultimate_layer_through_final_layer_norm(config):
    reference, ours = reference_and_ours(config)
    input_ids = prompt_ids(2, EOS, lengths=(7, 30))
    with torch.no_grad():
        expected = reference(input_ids, output_hidden_states=True)
        penultimate = reference.final_layer_norm(expected.hidden_states[-2])
        output = ours(input_ids, clip_skip=1)
    assert_close(output.last_hidden_state, penultimate)
    assert_close(output.pooled_output, expected.pooler_output)  # still the last layer's
    assert (output.last_hidden_state - expected.last_hidden_state).abs().max() > 1e-2


def test_legacy_eos_token_id_2_pools_at_argmax_of_ids():
    config = dataclasses.replace(SD1_SMALL, eos_token_id=2)
    reference, ours = reference_and_ours(config)
    input_ids = prompt_ids(2, EXCLAMATION, lengths=(4, 11))
    input_ids[0, 2] = 2  # the legacy id appears in the text; only the largest id (EOS) counts
    with torch.no_grad():
        expected = reference(input_ids)
        output = ours(input_ids)
    assert_close(output.pooled_output, expected.pooler_output)
    assert torch.equal(output.pooled_output[0], output.last_hidden_state[0, 5])


def test_pools_at_first_eos_when_an_added_token_has_a_larger_id():
    # a textual-inversion token appended to the vocabulary (id 49408) must not be taken for the EOS
    config = dataclasses.replace(SD1_SMALL, vocab_size=49409)
    reference, ours = reference_and_ours(config)
    input_ids = prompt_ids(2, EOS, lengths=(4, 11))
    input_ids[:, 2] = 49408
    with torch.no_grad():
        expected = reference(input_ids)
        output = ours(input_ids)
    assert_close(output.pooled_output, expected.pooler_output)
    assert torch.equal(output.pooled_output[0], output.last_hidden_state[0, 5])


def test_out_of_range_clip_skip_and_too_many_tokens_are_user_errors():
    model = CLIPTextModel(SD1_SMALL)
    with pytest.raises(FixativeError, match="clip_skip"):
        model(prompt_ids(1, EOS, lengths=(3,)), clip_skip=3)
    with pytest.raises(FixativeError, match="78 tokens"):
        model(torch.zeros(1, 78, dtype=torch.long))


def test_constructible_on_meta_device_and_loadable_with_assign():
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig())
    assert model.device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # SD 1.5's text encoder
    _, small = reference_and_ours(SD1_SMALL)
    with torch.device("meta"):
        model = CLIPTextModel(SD1_SMALL)
    model.load_state_dict(small.state_dict(), strict=True, assign=True)
    input_ids = prompt_ids(1, EOS, lengths=(9,))
    assert torch.equal(model(input_ids).last_hidden_state, small(input_ids).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_stays_near_fp32(dtype):
    _, ours = reference_and_ours(SD2_SMALL)
    input_ids = prompt_ids(2, EXCLAMATION, lengths=(6, 40))
    with torch.no_grad():
        expected = ours(input_ids).last_hidden_state
        output = ours.to(dtype)(input_ids)
    assert ours.dtype == dtype
    assert output.last_hidden_state.dtype == dtype and output.pooled_output.dtype == dtype
    assert (output.last_hidden_state.float() - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.slow
def test_full_sd15_text_encoder_matches_transformers():
    config = CLIPTextConfig()  # SD 1.5: CLIP ViT-L/14, 12 layers, 768 wide
    reference, ours = reference_and_ours(config)
    input_ids = prompt_ids(2, EOS, lengths=(8, 75))
    with torch.no_grad():
        expected = reference(input_ids, output_hidden_states=True)
        output = ours(input_ids)
        skipped = ours(input_ids, clip_skip=1)
    assert_close(output.last_hidden_state, expected.last_hidden_state)
    assert_close(output.pooled_output, expected.pooler_output)
    assert_close(skipped.last_hidden_state, reference.final_layer_norm(expected.hidden_states[-2]))
