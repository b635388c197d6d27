"""fixative's CLIP tokenizer against transformers' CLIPTokenizer (what diffusers pipelines use) and OpenCLIP's."""

import json
import warnings

import pytest
import torch
import transformers

from fixative.core.errors import FixativeError
from fixative.core.tokenizer import CLIPTokenizer

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "an oil painting of a lighthouse, by Claude Monet, trending on artstation",
    "portrait of a woman;; dramatic lighting!!! (masterpiece:1.2) [blurry]",
    "it's a dog's life, isn't it? they'll say we'd've ...",
    "She's RE-ENTERING the building's 3rd floor",
    "1920s poster, 42 cats, 3.14159, 1,000,000 stars, year 2077",
    "   leading, trailing and    inner   spaces   ",
    "tabs\tand\nnewlines\r\nand\u00a0no-break\u3000ideographic spaces",
    "café naïve résumé Ærø Straße",
    "e\u0301te\u0301 (decomposed accents)",
    "ΟΔΟΣ Ελλάδα Москва",
    "東京の夜景, 水墨画, 한국어 그림",
    "emoji 🐱🎨✨ art 👩‍🎨",
    "ﬁne ligatures and ½ fractions and ² superscripts",
    "İstanbul at dusk",
    "under_score snake_case and hyphen-ated words",
    "#hashtag @mention email@example.com https://example.com/path?q=1",
    "<lora:style:0.8> <|ENDOFTEXT|> <|endoftext|> inside",
    "quotes \"double\" 'single' `back` «guillemets»",
    "a" * 40,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "!!!!!!",
    "",
    " ",
    "wow!! so cool! amazing!!!",
    "zero-width\u200bjoiner and control\x1cchars",
    "a castle on a hill, " * 12,  # longer than 77 tokens
    "highly detailed, " * 40,  # far longer
    "word " * 75,  # exactly 77 with BOS and EOS
    "word " * 76,  # one too many
]


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1-tokenizer")
    CLIPTokenizer.bundled().save(folder)
    return folder


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2-tokenizer")
    CLIPTokenizer.bundled(pad_token="!").save(folder)
    return folder


def reference_ids(folder, prompts) -> torch.Tensor:
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    return reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_a_photo_of_a_cat_has_the_clip_ids():
    assert CLIPTokenizer.bundled().encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bundled_vocabulary_has_clip_layout():
    tokenizer = CLIPTokenizer.bundled()
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77
    assert tokenizer.vocab["!"] == 0 and tokenizer.vocab["!</w>"] == 256


def test_ids_match_transformers_on_varied_prompts_sd1(sd1_folder):
    ours = CLIPTokenizer.from_folder(sd1_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = ours(PROMPTS)
    expected = reference_ids(sd1_folder, PROMPTS)
    for prompt, row, expected_row in zip(PROMPTS, ids.tolist(), expected.tolist()):
        assert row == expected_row, prompt
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == torch.long


def test_ids_match_transformers_on_varied_prompts_sd2_exclamation_padding(sd2_folder):
    ours = CLIPTokenizer.from_folder(sd2_folder)
    assert ours.pad_token_id == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = ours(PROMPTS)
    expected = reference_ids(sd2_folder, PROMPTS)
    for prompt, row, expected_row in zip(PROMPTS, ids.tolist(), expected.tolist()):
        assert row == expected_row, prompt
    # padded with "!" after the EOS; like transformers, every "!" in the prompt is the pad token itself
    assert ids[0].tolist()[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert (ids[0, 7:] == 0).all()
    assert ours.encode("cool!!") == [49406, 2077, 0, 0, 49407]


def test_matches_openclip_on_plain_prompts():
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.tokenizer.SimpleTokenizer()
    ours = CLIPTokenizer.bundled()
    for prompt in PROMPTS[:8] + PROMPTS[20:22]:
        assert ours.encode(prompt)[1:-1] == reference.encode(prompt), prompt


def test_truncation_keeps_bos_and_eos_and_warns_with_the_count(sd1_folder):
    ours = CLIPTokenizer.from_folder(sd1_folder)
    prompt = "cat " * 100  # 100 word tokens + BOS + EOS = 102 -> 25 cut
    with pytest.warns(UserWarning, match="the last 25 tokens were cut") as caught:
        ids = ours([prompt, "a photo of a cat"])
    assert len(caught) == 1 and "cat cat cat" in str(caught[0].message)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] == 2368).all()
    assert torch.equal(ids, reference_ids(sd1_folder, [prompt, "a photo of a cat"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours("word " * 75)  # exactly 77: nothing cut, no warning


def test_from_folder_reads_tokenizer_json_written_by_transformers(sd2_folder, tmp_path):
    transformers.CLIPTokenizer.from_pretrained(sd2_folder).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for name in ("vocab.json", "merges.txt"):  # make sure the tokenizer.json path is the one taken
        (tmp_path / name).unlink(missing_ok=True)
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token_id == 0 and ours.model_max_length == 77
    assert torch.equal(ours(PROMPTS[:12]), reference_ids(sd2_folder, PROMPTS[:12]))


def test_from_folder_reads_tokenizer_json_with_string_merges_and_dict_special_tokens(tmp_path):
    bundled = CLIPTokenizer.bundled()
    model = {
        "type": "BPE",
        "vocab": bundled.vocab,
        "merges": [f"{a} {b}" for a, b in bundled.merges],
        "end_of_word_suffix": "</w>",
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": model}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps(
            {"pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}
        )
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 1000000000000000019884624838656, "pad_token": "<|endoftext|>"})
    )
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token == "!"  # special_tokens_map.json wins, as in transformers
    assert ours.model_max_length == 77  # transformers' "unset" marker falls back to CLIP's 77
    assert ours("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]


def test_model_max_length_comes_from_tokenizer_config(sd1_folder, tmp_path):
    CLIPTokenizer.from_folder(sd1_folder).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 16}))
    with pytest.warns(UserWarning, match="the last 2 tokens were cut"):
        ids = CLIPTokenizer.from_folder(tmp_path)(
            "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen eighteen"
        )
    assert ids.shape == (1, 16) and ids[0, -1] == 49407


def test_missing_vocab_or_merges_file_is_a_user_error_naming_it(sd1_folder, tmp_path):
    with pytest.raises(FixativeError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text((sd1_folder / "vocab.json").read_text())
    with pytest.raises(FixativeError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text((sd1_folder / "merges.txt").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(FixativeError, match="tokenizer_config.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_pad_token_outside_the_vocabulary_is_a_user_error():
    with pytest.raises(FixativeError, match="pad token"):
        CLIPTokenizer.bundled(pad_token="<pad>")


def test_save_then_from_folder_round_trips(sd2_folder, tmp_path):
    original = CLIPTokenizer.from_folder(sd2_folder)
    original.save(tmp_path)
    loaded = CLIPTokenizer.from_folder(tmp_path)
    assert loaded.vocab == original.vocab and loaded.merges == original.merges
    assert (loaded.pad_token, loaded.model_max_length) == ("!", 77)


def test_decode_returns_the_lowercased_words():
    tokenizer = CLIPTokenizer.bundled()
    assert tokenizer.decode(tokenizer.encode("A Café, 42 cats!")) == "a café , 4 2 cats !"
