"""The toy build path, at the `ci` size (seconds per stage), end to end."""

import hashlib
import json

import pytest
import torch
from torch import nn

from fixative.core.errors import FixativeError
from fixative.core.toy import build as toy_build
from fixative.core.toy import model_folder, toy_folder


@pytest.mark.slow
def test_ci_build_is_a_diffusers_folder_that_load_model_loads(ci_build):
    from fixative.core.checkpoints import load_model
    from fixative.core.pipelines import generate

    assert {p.name for p in ci_build.iterdir()} == {"sd", "clip", "atelier", "build.json"}
    model = load_model(ci_build / "sd")
    assert model.unet.config.block_out_channels == toy_build.TOY_UNET.block_out_channels
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size == 48
    assert model.vae.config.latent_channels == 4 and model.vae.config.downsampling_factor == 4
    assert model.scheduler_config["_class_name"] == "DDIMScheduler"
    assert 0.1 < model.vae.config.scaling_factor < 10  # 1 / std of the latents, measured
    images = generate(
        model, "a painting of a cat by kovra", num_inference_steps=2, seed=0, output="images", progress=False
    )
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    info = json.loads((ci_build / "build.json").read_text())
    assert info["size"] == "ci" and set(info["stage_seconds"]) == {"atelier", "clip", "vae", "unet", "assemble"}
    record = info["provenance"]
    assert record["versions"]["torch"] == torch.__version__ and record["dtype"] == "float16"
    unet = ci_build / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    assert record["models"]["sd"]["source"] == str(ci_build / "sd")
    assert (
        record["models"]["sd"]["sha256"]["unet/diffusion_pytorch_model.safetensors"]
        == hashlib.sha256(unet.read_bytes()).hexdigest()
    )
    assert len(record["models"]["clip"]["sha256"]) == 1  # model.safetensors
    # the folders the build writes load with diffusers' and transformers' defaults, as released ones do
    assert json.loads((ci_build / "clip" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((ci_build / "sd" / "text_encoder" / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.slow
def test_ci_build_sd_text_encoder_is_the_clip_text_tower_fine_tuned(ci_build):
    transformers = pytest.importorskip("transformers")
    from fixative.core.checkpoints import load_model
    from fixative.core.tokenizer import CLIPTokenizer

    clip = transformers.CLIPModel.from_pretrained(ci_build / "clip", dtype=torch.float32)
    model = load_model(ci_build / "sd")
    ours = model.text_encoder.state_dict()
    theirs = {k: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    assert set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    # trained jointly with the UNet: the tokens of the captions moved, a word no caption uses did not
    # (beyond AdamW's weight decay over the ci build's three steps)
    key = "text_model.embeddings.token_embedding.weight"
    seen = CLIPTokenizer.bundled()(["a painting of a house by kovra"])[0, 1:4]
    unseen = CLIPTokenizer.bundled()(["lighthouse"])[0, 1]
    assert not torch.allclose(ours[key][seen], theirs[key][seen], atol=1e-3)
    assert torch.allclose(ours[key][unseen], theirs[key][unseen], rtol=2e-3, atol=1e-4)
    processor = transformers.CLIPImageProcessor.from_pretrained(ci_build / "clip")
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]


@pytest.mark.slow
def test_rebuilding_a_finished_build_is_a_no_op(ci_build):
    stamp = (ci_build / "build.json").stat().st_mtime_ns
    assert toy_build.build(ci_build, size="ci", progress=False, log=lambda _: None) == ci_build
    assert (ci_build / "build.json").stat().st_mtime_ns == stamp


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    def run(folder, fail_at=None):
        torch.manual_seed(0)
        net = nn.Linear(4, 1)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1)

        def step_fn(step):
            if step == fail_at:
                raise KeyboardInterrupt
            generator = toy_build._generator(0, "test", step)
            x = torch.randn(8, 4, generator=generator)
            loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()

        folder.mkdir(exist_ok=True)
        toy_build._train("test", folder, 10, {"net": net, "optimizer": optimizer}, step_fn, 3, progress=False)
        return net

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_at=7)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 6
    resumed = run(tmp_path / "b")
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)


def test_half_finished_build_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("FIXATIVE_HOME", str(tmp_path))
    monkeypatch.setattr("fixative.core.toy.SHIPPED", tmp_path / "nothing-shipped")
    (tmp_path / "toy" / ".work-full-seed0" / "sd").mkdir(parents=True)
    with pytest.raises(FixativeError, match="fixative toy build"):
        toy_folder()
    finished = tmp_path / "toy" / "full-seed0"
    (finished / "sd").mkdir(parents=True)
    (finished / "build.json").write_text("{}")
    assert model_folder() == finished / "sd"


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(FixativeError, match="size"):
        toy_build.build(tmp_path / "x", size="huge")


def test_unknown_vae_variant_is_refused(tmp_path):
    with pytest.raises(FixativeError, match="unknown toy VAE 'f16'"):
        toy_build.build(tmp_path / "x", size="ci", vae="f16")


def test_the_unet_follows_the_vae_variants_latent_size():
    from fixative.core.presets import TOY_VAES

    assert toy_build.toy_unet_config(TOY_VAES["f4"]).sample_size == 16 == toy_build.TOY_UNET.sample_size
    assert toy_build.toy_unet_config(TOY_VAES["f8"]).sample_size == 8


def test_an_interrupted_build_resumes_only_with_its_own_vae(tmp_path):
    work = tmp_path / ".work-x"
    work.mkdir()
    (work / "vae_variant.txt").write_text("f4")
    with pytest.raises(FixativeError, match="--vae f4"):
        toy_build.build(tmp_path / "x", size="ci", vae="f8", progress=False, log=lambda _: None)


@pytest.mark.slow
def test_ci_build_with_the_sd_like_vae(tmp_path):
    from fixative.core.checkpoints import load_model
    from fixative.core.pipelines import generate
    from fixative.core.toy import SHIPPED

    with pytest.raises(FixativeError, match="not a toy CLIP folder"):
        toy_build.build(tmp_path / "bad", size="ci", vae="f8", clip=tmp_path, progress=False, log=lambda _: None)
    clip = SHIPPED / "clip"
    folder = toy_build.build(tmp_path / "ci-f8", size="ci", vae="f8", clip=clip, progress=False, log=lambda _: None)
    info = json.loads((folder / "build.json").read_text())
    assert info["vae"] == "f8" and info["clip_copied_from"] == str(clip.resolve()) and "clip" in info["stage_seconds"]
    # the judge is the given CLIP, byte for byte
    assert (folder / "clip" / "model.safetensors").read_bytes() == (clip / "model.safetensors").read_bytes()
    model = load_model(folder / "sd")
    assert model.vae.config.downsampling_factor == 8 and model.vae.config.mid_block_add_attention
    assert model.unet.config.sample_size == 8
    latents = generate(
        model, "a painting of a cat by kovra", num_inference_steps=2, seed=0, output="latents", progress=False
    )
    assert latents.shape == (1, 4, 8, 8)
