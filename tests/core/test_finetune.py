"""fine_tune: what trains, the DreamBooth loss, bit-exact resume, and the outputs in diffusers.

Tiny random SD models (the tiny-sd1 preset: 16 px images, 8x8 latents) and a handful of random images.
"""

import json

import numpy as np
import pytest
import torch

from fixative.core.datasets import ImageCaptions
from fixative.core.errors import FixativeError
from fixative.core.finetune import Batch, DenoisingObjective, FinetuneConfig, fine_tune
from fixative.core.lora import LORA_WEIGHTS_NAME, LoRALinear, apply_lora
from fixative.core.model import StableDiffusionModel
from fixative.core.pipelines import generate
from fixative.core.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(seed: int = 0) -> StableDiffusionModel:
    preset = get_preset("tiny-sd1")
    torch.manual_seed(seed)
    model = StableDiffusionModel.from_config(preset.model_config, preset.scheduler_config)
    with torch.no_grad():  # weights large enough that a render depends on every network
        for network in model.networks().values():
            for p in network.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())) * 0.05)
    return model


def tiny_data(count: int = 6, seed: int = 0) -> ImageCaptions:
    generator = torch.Generator().manual_seed(seed)
    return ImageCaptions(
        torch.rand(count, 3, 16, 16, generator=generator) * 2 - 1,
        [f"a painting of a thing {i} by someone" for i in range(count)],
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {
        f"{network}.{name}": p.detach().clone()
        for network, module in model.networks().items()
        for name, p in module.named_parameters()
    }


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_one_full_step_changes_the_unet_and_the_text_encoder_only_when_asked(train_text_encoder):
    model = tiny_model()
    before = snapshot(model)
    fine_tune(
        model,
        tiny_data(),
        FinetuneConfig(max_steps=1, batch_size=2, lr=1e-3, train_text_encoder=train_text_encoder),
        progress=False,
    )
    moved = changed(before, snapshot(model))
    trained = {n for n in before if n.startswith("unet.") or (train_text_encoder and n.startswith("text_encoder."))}
    assert moved <= trained
    assert len(moved) >= 0.9 * len(trained)
    assert not any(n.startswith("vae.") for n in moved)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_one_lora_step_changes_only_the_adapters(train_text_encoder):
    model = tiny_model()
    before = snapshot(model)
    fine_tune(
        model,
        tiny_data(),
        FinetuneConfig(
            method="lora", rank=2, max_steps=1, batch_size=2, lr=1e-3, train_text_encoder=train_text_encoder
        ),
        progress=False,
    )
    after = snapshot(model)
    assert not changed(before, {n: after[n] for n in before})  # every original weight as it was
    adapters = {n for n in after if ".lora_" in n}
    assert adapters and all(n.startswith("unet.") or train_text_encoder for n in adapters)
    assert any(n.startswith("text_encoder.") for n in adapters) == train_text_encoder
    ups = [m.lora_up.weight for m in model.unet.modules() if isinstance(m, LoRALinear)]
    assert all(up.abs().max() > 0 for up in ups)  # B left zero by no step


def test_prior_preservation_loss_equals_a_hand_computation():
    model = tiny_model()
    config = FinetuneConfig(prior_loss_weight=0.7)
    objective = DenoisingObjective()
    objective.setup(model, config)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(5, 77, 32, generator=torch.Generator().manual_seed(2))
    is_prior = torch.tensor([False, False, False, True, True])
    batch = Batch(latents, torch.zeros(5, 77, dtype=torch.long), text, is_prior, [""] * 5)
    loss = objective.loss(batch, torch.Generator().manual_seed(3))

    generator = torch.Generator().manual_seed(3)
    timesteps = torch.randint(0, 1000, (5,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    alpha_bar = objective.schedule.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    errors = (model.unet(noisy, timesteps, text) - noise).pow(2).mean((1, 2, 3))
    expected = errors[:3].mean() + 0.7 * errors[3:].mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss.item(), expected.item())


class Recording(DenoisingObjective):
    def __init__(self):
        super().__init__()
        self.batches = []

    def loss(self, batch, generator):
        self.batches.append(batch)
        return super().loss(batch, generator)


def test_dreambooth_batches_hold_instance_images_then_generated_class_images(tmp_path):
    model = tiny_model()
    objective = Recording()
    config = FinetuneConfig(
        method="dreambooth",
        instance_prompt="a painting by sks",
        class_prompt="a painting",
        prior_images=3,
        prior_batch_size=1,
        max_steps=2,
        batch_size=2,
        validation_prompts=("a painting by sks",),
        validation_steps=2,
    )
    fine_tune(model, tiny_data(), config, objective, out=tmp_path / "out", progress=False)
    for batch in objective.batches:
        assert batch.captions == ["a painting by sks"] * 2 + ["a painting"]
        assert batch.is_prior.tolist() == [False, False, True] and batch.latents.shape == (3, 4, 8, 8)
    assert (tmp_path / "out" / "validation" / "final" / "00.png").exists()
    assert (tmp_path / "out" / "model_index.json").exists()


class Interrupt(DenoisingObjective):
    """Stops the run (as a kill would) at the ``at``-th loss."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def loss(self, batch, generator):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().loss(batch, generator)


@pytest.mark.parametrize("method, precision", [("full", "no"), ("lora", "no"), ("lora", "bf16")])
def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, method, precision):
    config = FinetuneConfig(
        method=method,
        rank=2,
        max_steps=5,
        batch_size=2,
        gradient_accumulation=2,
        lr=1e-3,
        lr_schedule="cosine",
        warmup=2,
        ema_decay=0.9,
        caption_dropout=0.3,
        snr_gamma=5.0,
        offset_noise=0.1,
        train_text_encoder=precision == "no",
        mixed_precision=precision,
        checkpoint_every=2,
        seed=4,
    )

    def run(out, objective=None, resume=False):
        model = tiny_model()
        torch.manual_seed(0)  # LoRA's initial A
        fine_tune(model, tiny_data(), config, objective, out=out, resume=resume, progress=False, log=lambda _: None)
        return snapshot(model)

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", Interrupt(at=7))  # in step 4 (two micro-batches a step): steps 1-3 done
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-2"]
    with pytest.raises(Exception, match="resume"):
        run(tmp_path / "b")
    resumed = run(tmp_path / "b", resume=True)
    assert straight.keys() == resumed.keys()
    assert not changed(straight, resumed)
    assert not (tmp_path / "b" / "checkpoints").exists()


class DtypeSpy(DenoisingObjective):
    """Records the dtypes of the networks' weights while the loss is computed."""

    def loss(self, batch, generator):
        unet = self.model.unet
        self.seen = {
            "vae": self.model.vae.dtype,
            "text_encoder": self.model.text_encoder.dtype,
            "unet": unet.conv_in.weight.dtype,
            "adapters": {p.dtype for n, p in unet.named_parameters() if "lora_" in n},
            "latents": batch.latents.dtype,
        }
        return super().loss(batch, generator)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("frozen_in_mixed_precision", [True, False])
def test_frozen_networks_are_held_in_the_mixed_precision_dtype_and_cast_back(method, frozen_in_mixed_precision):
    model = tiny_model()
    before = snapshot(model)
    spy = DtypeSpy()
    fine_tune(
        model,
        tiny_data(),
        FinetuneConfig(
            method=method,
            rank=2,
            max_steps=1,
            batch_size=2,
            lr=1e-3,
            mixed_precision="bf16",
            frozen_in_mixed_precision=frozen_in_mixed_precision,
        ),
        spy,
        progress=False,
    )
    frozen = torch.bfloat16 if frozen_in_mixed_precision else torch.float32
    assert spy.seen["vae"] == spy.seen["text_encoder"] == frozen
    assert spy.seen["unet"] == (frozen if method == "lora" else torch.float32)  # LoRA: the frozen base weights
    assert spy.seen["adapters"] == ({torch.float32} if method == "lora" else set())
    assert spy.seen["latents"] == torch.float32
    after = snapshot(model)
    assert all(p.dtype == torch.float32 for p in after.values())  # cast back to their own dtype ...
    vae = [n for n in before if n.startswith("vae.")]
    if frozen_in_mixed_precision:  # ... with their weights rounded to bf16
        assert all(torch.equal(after[n], before[n].bfloat16().float()) for n in vae)
    else:
        assert not changed({n: before[n] for n in vae}, after)


def render_ours(model, prompt="a painting of a thing by someone"):
    images = generate(
        model,
        prompt,
        num_inference_steps=4,
        guidance_scale=3.0,
        scheduler="ddim",
        seed=0,
        output="images",
        progress=False,
    )
    return images[0].permute(1, 2, 0).float().numpy()


def render_diffusers(pipe, prompt="a painting of a thing by someone"):
    import diffusers

    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=4,
        guidance_scale=3.0,
        height=16,
        width=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def assert_same_render(ours, theirs):
    difference = np.abs(ours - theirs).max()
    assert difference <= 2 / 255, f"max pixel difference {difference * 255:.2f}/255"


def test_full_output_loads_in_diffusers_with_default_arguments_and_renders_the_same(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = tiny_model()
    before = render_ours(model)
    fine_tune(
        model,
        tiny_data(),
        FinetuneConfig(max_steps=2, batch_size=2, lr=1e-2, train_text_encoder=True),
        out=tmp_path / "out",
        progress=False,
    )
    ours = render_ours(model)
    assert np.abs(ours - before).max() > 2 / 255  # the fine-tune changed the render
    record = json.loads((tmp_path / "out" / "finetune_config.json").read_text())
    assert record["config"]["max_steps"] == 2 and record["provenance"]["versions"]["torch"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert_same_render(ours, render_diffusers(pipe))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    from fixative.core.checkpoints import save_diffusers

    return save_diffusers(tiny_model(), tmp_path_factory.mktemp("base") / "sd")


def test_lora_output_loads_in_diffusers_and_renders_the_same(tmp_path, base_folder):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fixative.core.checkpoints import load_model

    model = load_model(base_folder)
    torch.manual_seed(0)
    config = FinetuneConfig(
        method="lora",
        rank=4,
        alpha=8,
        max_steps=3,
        batch_size=2,
        lr=3e-2,
        train_text_encoder=True,
        lora_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    )
    fine_tune(model, tiny_data(), config, out=tmp_path / "lora", progress=False)
    ours = render_ours(model)
    assert np.abs(ours - render_ours(load_model(base_folder))).max() > 2 / 255
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base_folder)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_WEIGHTS_NAME)
    assert_same_render(ours, render_diffusers(pipe))
    merged = load_model(base_folder)  # our file merged into the weights, as `fixative generate --lora` does
    adapters = sum(isinstance(m, LoRALinear) for network in model.networks().values() for m in network.modules())
    assert apply_lora(merged, tmp_path / "lora" / LORA_WEIGHTS_NAME) == adapters
    assert_same_render(ours, render_ours(merged))


def kohya_file(model, path, rank=4):
    """A kohya-style LoRA (lora_unet_* / lora_te_*, lora_down / lora_up / alpha) with random weights: the
    attention projections, the transformers' 1x1 convolutions proj_in / proj_out and one 3x3 resnet
    convolution (LoCon)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(5)
    state = {}
    unet_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "down_blocks.0.resnets.0.conv1")
    for prefix, network, targets in (
        ("lora_unet_", model.unet, unet_targets),
        ("lora_te_", model.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj")),
    ):
        for name, module in network.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(targets):
                key = prefix + name.replace(".", "_")
                if isinstance(module, torch.nn.Linear):
                    down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
                else:
                    down_shape = (rank, module.in_channels, *module.kernel_size)
                    up_shape = (module.out_channels, rank, 1, 1)
                state[key + ".lora_down.weight"] = (
                    torch.randn(down_shape, generator=generator) * 0.3 / down_shape[1] ** 0.5
                )
                state[key + ".lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.3
                state[key + ".alpha"] = torch.tensor(2.0)
    save_file(state, path)
    return path


def test_a_kohya_file_renders_as_diffusers_renders_it(tmp_path, base_folder):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fixative.core.checkpoints import load_model

    model = load_model(base_folder)
    path = kohya_file(model, tmp_path / "kohya.safetensors")
    plain = render_ours(model)
    # 4 transformers x (2 attentions x 4 + proj_in + proj_out), one resnet convolution, 2 text layers x 4
    assert apply_lora(model, path, scale=0.8) == 4 * 10 + 1 + 2 * 4
    ours = render_ours(model)
    assert np.abs(ours - plain).max() > 2 / 255
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base_folder)
    pipe.load_lora_weights(path, adapter_name="kohya")
    pipe.set_adapters(["kohya"], adapter_weights=[0.8])
    assert_same_render(ours, render_diffusers(pipe))


MULTI_PROCESS_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_finetune import tiny_data, tiny_model
from fixative.core.finetune import FinetuneConfig, fine_tune
import accelerate
model = tiny_model()
fine_tune(model, tiny_data(), FinetuneConfig(max_steps=2, batch_size=2, lr=1e-3, checkpoint_every=1), out=sys.argv[1],
          device=sys.argv[3], progress=False)
state = accelerate.PartialState()
weights = {n: p.detach() for n, p in model.unet.named_parameters()}
torch.save({"weights": weights, "processes": state.num_processes}, f"{sys.argv[1]}/../rank{state.process_index}.pt")
"""


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_two_processes_under_torchrun_train_together_and_one_writes(tmp_path, device):
    """Both processes join one process group (also with --device auto on a machine without a GPU, where they used
    to train alone, each on the whole batch), end with the same weights, and only the main one writes."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside the interpreter")
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("with a GPU, --device auto trains on it: two processes need two GPUs")
    script = tmp_path / "train.py"
    script.write_text(MULTI_PROCESS_SCRIPT)
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "out"),
            str(Path(__file__).parent),
            device,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved0, saved1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert saved0["processes"] == saved1["processes"] == 2
    rank0, rank1 = saved0["weights"], saved1["weights"]
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    before = {n: p for n, p in tiny_model().unet.named_parameters()}
    assert any(not torch.equal(rank0[n], before[n]) for n in rank0)
    assert (tmp_path / "out" / "model_index.json").exists() and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_an_ema_decay_outside_zero_to_one_is_refused(decay):
    with pytest.raises(FixativeError, match=r"EMA decay must be within \[0, 1\)"):
        FinetuneConfig(ema_decay=decay)
    FinetuneConfig(ema_decay=0.999)  # inside: accepted


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_said_in_one_line(monkeypatch, native_bf16):
    monkeypatch.setattr("fixative.core.layout.mkldnn_bf16_supported", lambda: native_bf16)
    lines = []
    config = FinetuneConfig(method="lora", rank=2, max_steps=1, batch_size=2, mixed_precision="bf16")
    fine_tune(tiny_model(), tiny_data(), config, progress=False, log=lines.append)
    warned = [line for line in lines if "no native bf16" in line and "--mixed-precision no" in line]
    assert len(warned) == (0 if native_bf16 else 1)
