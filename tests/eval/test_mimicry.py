"""The mimicry protocol: protection rates by hand, caption handling, and `fixative mimic` end to end (tiny)."""

import json
import math

import pytest
import torch
from PIL import Image

from fixative.cli import main
from fixative.core.errors import FixativeError
from fixative.eval.mimicry import protection, read_artist_folder


def test_protection_rate_and_interval_by_hand():
    predicted = ["zenji"] * 7 + ["kovra"] * 2 + ["lumo"]
    result = protection(predicted, "zenji", ["kovra", "lumo", "zenji", "tovik"])
    assert result["protection_rate"] == pytest.approx(0.3) and result["protected"] == 3
    z = 1.959963984540054
    n, p = 10, 0.3
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert result["protection_interval"] == pytest.approx([centre - half, centre + half], abs=1e-12)
    assert result["attributed_to"] == {"kovra": 2, "lumo": 1, "zenji": 7, "tovik": 0}


def write_artist(folder, paintings, artist="zenji", subjects=("house", "cat", "boat", "sun"), metadata=True):
    folder.mkdir(parents=True)
    images = paintings(artist, list(subjects))
    lines = []
    for i, (image, subject) in enumerate(zip(images, subjects)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
        lines.append(
            json.dumps(
                {"file_name": f"{i:02d}.png", "text": f"a painting of a {subject} by {artist}", "artist": artist}
            )
            + "\n"
        )
    if metadata:
        (folder / "metadata.jsonl").write_text("".join(lines))
    return folder


def test_captions_name_the_new_name(tmp_path, paintings):
    folder = write_artist(tmp_path / "zenji", paintings)
    pixels, captions, artist, skipped = read_artist_folder(folder, "nabu", None, 64)
    assert artist == "zenji" and skipped == [] and pixels.shape == (4, 3, 64, 64)
    assert captions[1] == "a painting of a cat by nabu"
    assert pixels.min() >= -1 and pixels.max() <= 1
    bare = write_artist(tmp_path / "bare", paintings, metadata=False)
    _, captions, artist, _ = read_artist_folder(bare, "nabu", None, 32)
    assert captions == ["a painting by nabu"] * 4 and artist is None


@pytest.mark.slow
def test_mimic_command_writes_results_and_does_not_redo_a_finished_run(tmp_path, paintings, shipped, capsys):
    """Mechanics only (2 fine-tuning steps, 2 DDIM steps): the keys, counts and provenance of results.json."""
    images = write_artist(tmp_path / "zenji", paintings)
    prior = write_artist(tmp_path / "prior", paintings, artist="kovra")
    held_out = write_artist(tmp_path / "held", paintings, subjects=("tree", "fish"))
    argv = [
        "mimic",
        "--images",
        str(images),
        "--name",
        "nabu",
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--samples",
        "1",
        "--sampling-steps",
        "2",
        "--prior",
        str(prior),
        "--held-out",
        str(held_out),
        "--adversary",
        "jpeg:75",
        "--sampler",
        "lcm",
        "--check-sampler",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "protection rate" in printed and "not attributed to zenji" in printed and "sampler check: the share" in printed
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["generations"] == 8 and sum(results["attributed_to"].values()) == 8
    # the LCM-LoRA sampler, checked against DDIM on the same prompts and seeds
    assert results["sampler"] == {"scheduler": "lcm", "num_inference_steps": 3, "guidance_scale": 1.0}
    check = results["sampler_check"]
    assert check["reference"] == {"scheduler": "ddim", "num_inference_steps": 25, "guidance_scale": 5.0}
    assert check["reference_attributed"]["trials"] == 8 == check["generations"]
    assert 0 <= check["paired_agreement"] <= 1
    assert check["agrees"] == (
        check["reference_attributed"]["low"]
        <= check["distilled_attributed"]["value"]
        <= check["reference_attributed"]["high"]
    )
    assert len(results["attributed_to"]) == 10  # every Atelier artist is a candidate
    low, high = results["protection_interval"]
    assert 0 <= low <= results["protection_rate"] <= high <= 1
    assert results["adversaries"] == ["jpeg:quality=75"] and -1 <= results["similarity_to_held_out"] <= 1
    assert results["provenance"]["seed"] == 0 and len(results["inputs"]["images"]) == 4
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 8
    stamp = (tmp_path / "run" / "results.json").stat().st_mtime_ns
    assert main(argv) == 0 and (tmp_path / "run" / "results.json").stat().st_mtime_ns == stamp
    assert main([*argv[:-3], "--seed", "1", "--device", "cpu", "--quiet"]) == 2  # other settings, same folder
    assert "other inputs or settings" in capsys.readouterr().err


def test_lcm_agrees_with_ddim_when_its_share_lies_in_ddims_interval():
    from fixative.eval.mimicry import samplers_agree

    # the lead's zenji control: DDIM 384/384, LCM-2 383/384 -> agrees (DDIM's interval reaches down to 99.0%)
    check = samplers_agree({"zenji": 383, "kovra": 1}, {"zenji": 384, "kovra": 0}, "zenji")
    assert check["agrees"] and check["reference_attributed"]["low"] == pytest.approx(0.99010, abs=1e-4)
    assert check["distilled_attributed"]["value"] == pytest.approx(383 / 384)
    # both at 100% (tovik's control): agrees (DDIM's interval reaches exactly 1)
    assert samplers_agree({"tovik": 384}, {"tovik": 384, "tazu": 0}, "tovik")["agrees"]
    # the weak LoRA mimic: DDIM 75%, LCM-2 95% -> disagrees
    assert not samplers_agree({"zenji": 365, "lumo": 19}, {"zenji": 288, "lumo": 96}, "zenji")["agrees"]
    # just inside and just outside DDIM's interval at 300/384 (Wilson 95%: [73.7, 82.0])
    assert samplers_agree({"zenji": 285, "x": 99}, {"zenji": 300, "x": 84}, "zenji")["agrees"]  # 74.2%
    assert not samplers_agree({"zenji": 281, "x": 103}, {"zenji": 300, "x": 84}, "zenji")["agrees"]  # 73.2%


def test_the_sampler_setting_reaches_generate(shipped, monkeypatch):
    from fixative.core import pipelines
    from fixative.core.checkpoints import load_model
    from fixative.eval.mimicry import MimicConfig, sample

    model = load_model("toy")
    calls = []

    def fake_generate(model, prompts, **kwargs):
        calls.append((model, kwargs))
        return torch.zeros(len(prompts), 3, 64, 64)

    monkeypatch.setattr(pipelines, "generate", fake_generate)
    config = MimicConfig(sampler="lcm", lcm_steps=2, sample_batch=3)
    pixels = sample(model, ["a", "b", "c", "d"], [1, 2, 3, 4], config)
    assert pixels.shape == (4, 3, 64, 64) and float(pixels.min()) == -1.0  # [0, 1] images -> [-1, 1]
    assert [kwargs["seed"] for _, kwargs in calls] == [[1, 2, 3], [4]]
    sampler, kwargs = calls[0]
    assert (kwargs["scheduler"], kwargs["num_inference_steps"], kwargs["guidance_scale"]) == ("lcm", 2, 1.0)
    assert sampler is not model and sampler.scheduler_config["_class_name"] == "LCMScheduler"
    lora_unet, teacher_unet = sampler.unet.state_dict(), model.unet.state_dict()
    assert any(not torch.equal(lora_unet[k], teacher_unet[k]) for k in teacher_unet)  # the LCM-LoRA is merged in
    calls.clear()
    sample(model, ["a"], [1], config, sampler="ddim")  # the check's reference, from the same config
    sampler, kwargs = calls[0]
    assert sampler is model and (kwargs["scheduler"], kwargs["num_inference_steps"], kwargs["guidance_scale"]) == (
        "ddim",
        25,
        5.0,
    )
    with pytest.raises(FixativeError, match="sampler must be one of"):
        MimicConfig(sampler="euler")
    with pytest.raises(FixativeError, match="1 to 4 steps"):
        MimicConfig(sampler="lcm", lcm_steps=8)


def test_rounds_cover_the_fixed_set_and_keep_each_generations_seed_index():
    from fixative.eval.mimicry import MimicConfig

    assert MimicConfig(samples_per_prompt=5).rounds(3) == [list(range(15))]  # one round: the fixed set, in order
    rounds = MimicConfig(samples_per_prompt=5, interval_half_width=0.1, round_per_prompt=2).rounds(3)
    assert rounds == [[0, 1, 5, 6, 10, 11], [2, 3, 7, 8, 12, 13], [4, 9, 14]]  # k * 5 + j: prompt k's j-th
    with pytest.raises(FixativeError, match="interval_half_width"):
        MimicConfig(interval_half_width=0.7)


class _Judge:
    """Attributes generation i (its pixels hold i) to answers[i]."""

    def __init__(self, answers):
        self.answers, self.artists = answers, ["zenji", "kovra"]

    def classify(self, images):
        return [self.answers[int(v)] for v in images[:, 0, 0, 0]], None


def _fake_mimicry(monkeypatch, answers, reference_answers=None):
    """mimicry with the fine-tune and the sampler replaced: each generation's pixels carry its seed's index;
    the reference sampler's generations are judged by ``reference_answers``."""
    from fixative.eval import mimicry as module

    monkeypatch.setattr(module, "fine_tune_mimic", lambda model, *args: (model, 0.0))
    drawn = []

    def fake_sample(model, prompts, seeds, config, sampler=None):
        indices = torch.tensor([s - module.sample_seeds(config.seed, 1)[0] for s in seeds], dtype=torch.float32)
        drawn.append((sampler, indices.long().tolist()))
        offset = 1000 if sampler == "reference" else 0
        return (indices + offset).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()

    monkeypatch.setattr(module, "sample", fake_sample)
    table = dict(enumerate(answers)) | {1000 + i: a for i, a in enumerate(reference_answers or answers)}
    return module, _Judge(table), drawn


def test_sampling_to_an_interval_stops_once_it_is_narrow_enough(monkeypatch):
    # every generation attributed to the artist: 0/16 protected has the Wilson interval [0, 19.4%], +-9.7 points
    module, judge, drawn = _fake_mimicry(monkeypatch, ["zenji"] * 64)
    config = module.MimicConfig(samples_per_prompt=16, interval_half_width=0.1, round_per_prompt=4)
    results, generations = module.mimicry(None, None, [], "zenji", ["a", "b", "c", "d"], judge, config, log=print)
    assert results["generations"] == 16 and len(drawn) == 1 and results["first_round"] == 16
    assert drawn[0][1] == [0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51]
    assert results["generation_prompts"] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4
    # half the generations protected: the interval stays wider than +-10 points until all 64 are drawn
    module, judge, drawn = _fake_mimicry(monkeypatch, ["zenji", "kovra"] * 32)
    results, generations = module.mimicry(None, None, [], "zenji", ["a", "b", "c", "d"], judge, config, log=print)
    assert results["generations"] == 64 and len(drawn) == 4 and results["protection_rate"] == 0.5
    assert sorted(int(v) for v in generations[:, 0, 0, 0]) == list(range(64))  # the fixed set, in round order


def test_a_sampler_check_on_the_first_generations_reports_paired_agreement(monkeypatch):
    answers = ["zenji"] * 16
    reference = ["zenji", "kovra"] * 8  # the reference disagrees on every odd generation
    module, judge, drawn = _fake_mimicry(monkeypatch, answers, reference)
    config = module.MimicConfig(samples_per_prompt=4, num_inference_steps=10, check_per_prompt=2)
    results, _ = module.mimicry(
        None, None, [], "zenji", ["a", "b", "c", "d"], judge, config, check_sampler="reference", log=print
    )
    check = results["sampler_check"]
    assert drawn[-1] == ("reference", [0, 1, 4, 5, 8, 9, 12, 13])  # the first two of each prompt
    assert check["generations"] == 8 and check["paired_agreement"] == 0.5
    assert check["reference"]["num_inference_steps"] == 25 and check["reference_protection_rate"] == 0.5
    assert not check["agrees"]  # 100% attributed to zenji against the reference's 50% [21.5, 78.5]
    config = module.MimicConfig(samples_per_prompt=4, check_per_prompt=2)  # 25-step DDIM is the reference
    results, _ = module.mimicry(None, None, [], "zenji", ["a"], judge, config, check_sampler="reference", log=print)
    assert "sampler_check" not in results
