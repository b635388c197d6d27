"""The protection grid's pieces: cell specs (bench's and cloak_efficacy's, in one), their cloak settings, 'best'."""

import pytest
import torch

from fixative.core.errors import FixativeError
from fixative.eval.protection import best_method, cloak_config, parse_cell, resolve


@pytest.mark.parametrize(
    "spec",
    [  # what toy_protection.toml and cloak_efficacy.py have written
        "clean",
        "glaze:psnr=36",
        "glaze:psnr=28:steps=50",
        "plain:linf=8/255",
        "plain:linf=32/255:jpeg",
        "glaze:psnr=24:jpeg",
        "glaze:psnr=24:eot",
        "mist:psnr=32:weight=0.5",
        "anti-dreambooth:psnr=32:every=5:slr=1e-4",
        "photoguard:psnr=32:pgd:lr=0.002",
    ],
)
def test_every_spec_written_so_far_parses(spec):
    cell = parse_cell(spec)
    assert cell.spec == spec and cell.method == spec.partition(":")[0]
    if cell.method != "clean":
        cloak_config(cell, seed=0)


def test_cell_options_reach_the_cloak_config():
    cell = parse_cell("glaze:psnr=28:linf=16/255:steps=50:lr=0.002:pgd:strength=0.4:eot:target=kovra")
    assert cell.budget == ("psnr=28", "linf=16/255") and cell.options["target"] == "kovra"
    config = cloak_config(cell, seed=3)
    assert config.method == "glaze" and config.seed == 3
    assert config.budget.psnr == 28 and config.budget.linf == pytest.approx(16 / 255)
    assert (config.optimiser.steps, config.optimiser.lr, config.optimiser.optimiser) == (50, 0.002, "pgd")
    assert config.style_target.strength == 0.4 and config.robust == ("jpeg", "resize", "blur", "noise")
    adb = cloak_config(parse_cell("anti-dreambooth:every=5:slr=1e-4"), seed=0)
    assert adb.aspl.every == 5 and adb.aspl.surrogate_lr == 1e-4 and adb.budget.psnr == 32  # default budget
    assert cloak_config(parse_cell("mist:weight=0.5:robust=jpeg,blur"), 0).mist_semantic_weight == 0.5
    assert cloak_config(parse_cell("mist:robust=jpeg,blur"), 0).robust == ("jpeg", "blur")
    semantic = cloak_config(parse_cell("glaze:psnr=24:pool=8:semantic=0.5:captions"), 0)
    assert (semantic.latent_pool, semantic.semantic_weight, semantic.semantic_prompt) == (
        8,
        0.5,
        "{caption} by {style}",
    )
    plain = cloak_config(parse_cell("glaze:psnr=24"), 0)
    assert (plain.latent_pool, plain.semantic_weight, plain.semantic_prompt) == (1, 0.0, None)


def test_a_captions_cell_prompts_each_painting_with_its_own_subject_in_the_target_style(toy_model, monkeypatch):
    from fixative.cloak import objectives
    from fixative.core.toy import atelier
    from fixative.eval.protection import cloak_cell

    seen = []
    real = objectives.glaze
    monkeypatch.setattr(objectives, "glaze", lambda *a, **k: seen.append(a[7]) or real(*a, **k))
    clean = torch.rand(2, 3, 64, 64) * 2 - 1
    cell = parse_cell("glaze:psnr=30:steps=1:pool=16:semantic=1:captions")
    result = cloak_cell(
        toy_model, clean, cell, 0, "kovra", {"strength": 0.5}, ["a painting of a cat", "a painting of a boat"]
    )
    assert result["pixels"].shape == clean.shape
    assert seen == [[atelier.caption("cat", "kovra"), atelier.caption("boat", "kovra")]]  # the toy's caption form
    with pytest.raises(FixativeError, match="no caption"):
        cloak_cell(toy_model, clean, cell, 0, "kovra", {"strength": 0.5})


def test_plain_is_issue_10s_recipe_and_defaults_come_between_the_cloak_and_the_cell():
    plain = cloak_config(parse_cell("plain:linf=16/255"), 0, defaults={"lr": 0.005, "strength": 0.5})
    assert plain.method == "glaze" and (plain.optimiser.steps, plain.optimiser.lr) == (100, 0.01)
    assert plain.style_target.strength == 0.6 and plain.optimiser.optimiser == "adam"
    glaze = cloak_config(parse_cell("glaze:psnr=32"), 0, defaults={"lr": 0.005, "strength": 0.6})
    assert glaze.optimiser.lr == 0.005 and glaze.style_target.strength == 0.6
    assert cloak_config(parse_cell("glaze:psnr=32:lr=0.02"), 0, defaults={"lr": 0.005}).optimiser.lr == 0.02
    with pytest.raises(FixativeError, match="unknown setting"):
        cloak_config(parse_cell("glaze:psnr=32"), 0, defaults={"learning_rate": 0.1})


def test_jpeg_is_an_adversary_before_mimicry_not_part_of_the_cloak():
    cell = parse_cell("plain:linf=32/255:jpeg")
    assert cell.jpeg and cell.cloak_spec == "plain:linf=32/255" and "jpeg" not in cell.options
    assert cell.attack("none") == "jpeg:75" and cell.attack("impress:steps=10") == "jpeg:75+impress:steps=10"
    assert parse_cell("glaze:psnr=32").attack("none") == "none"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("glace:psnr=32", "method must be one of"),
        ("glaze:psnr", "METRIC=VALUE"),
        ("glaze:steps=ten", "not a number"),
        ("clean:psnr=32", "takes no budget"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_cell(spec, message):
    with pytest.raises(FixativeError, match=message) as error:
        parse_cell(spec)
    assert spec in str(error.value) and "\n" not in str(error.value)


def test_best_is_the_highest_mean_protection_without_an_adversary():
    rows = [
        {"cell": "clean", "adversary": "none", "protection_rate": 0.9},
        {"cell": "glaze:psnr=32", "adversary": "none", "protection_rate": 0.2},
        {"cell": "glaze:psnr=24", "adversary": "none", "protection_rate": 0.6},  # glaze: mean 0.4
        {"cell": "mist:psnr=32", "adversary": "none", "protection_rate": 0.3},
        {"cell": "mist:psnr=24", "adversary": "none", "protection_rate": 0.4},  # mist: mean 0.35
        {"cell": "mist:psnr=24", "adversary": "jpeg:75", "protection_rate": 1.0},  # not counted
    ]
    assert best_method(rows) == "glaze"
    assert resolve("best:psnr=24:steps=50", "glaze") == "glaze:psnr=24:steps=50"
    assert resolve("mist:psnr=24", "glaze") == "mist:psnr=24"
    assert best_method(rows[:1]) is None
    with pytest.raises(FixativeError, match="needs an earlier grid"):
        resolve("best:psnr=24", None)


def test_the_cloak_labs_plus_syntax_and_short_names_mean_the_same_cell():
    lab = parse_cell("adb+t=lumo+psnr=24+steps=100+slr=0.001")
    assert lab.method == "anti-dreambooth" and lab.budget == ("psnr=24",)
    assert lab.options == {"target": "lumo", "steps": 100, "slr": 0.001}
    assert lab.cloak_spec == "adb:t=lumo:psnr=24:steps=100:slr=0.001"
    glaze = cloak_config(parse_cell("glaze+t=kovra+st=0.4+opt=pgd+alpha=10+psnr=28"), 0)
    assert glaze.style_target.strength == 0.4 and glaze.optimiser.optimiser == "pgd" and glaze.optimiser.alpha == 10
    assert resolve("best+psnr=24", "mist") == "mist+psnr=24"
    assert best_method([{"cell": "adb+psnr=24", "adversary": "none", "protection_rate": 0.5}]) == "anti-dreambooth"


def test_the_cloak_code_hash_is_read_once_so_an_edit_during_a_run_does_not_rekey_its_stages(monkeypatch):
    from fixative.eval import features, protection

    protection.cloak_code_sha256.cache_clear()
    hashes = iter(["before the edit", "after the edit"])
    monkeypatch.setattr(features, "folder_sha256", lambda folder, suffixes: next(hashes))
    try:
        assert protection.cloak_code_sha256() == protection.cloak_code_sha256() == "before the edit"
    finally:
        protection.cloak_code_sha256.cache_clear()  # later tests read the real source again
