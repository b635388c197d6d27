"""CLIP score against torchmetrics' CLIPScore on the toy CLIP."""

import pytest
import torch

from fixative.core.errors import FixativeError
from fixative.eval.clip_score import CLIPScorer
from fixative.eval.features import load_clip

SUBJECTS = ["house", "tree", "boat", "sun", "fish", "cat"]


class Transformers5CLIP(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns output objects."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def torchmetrics_score(folder, images, prompts) -> float:
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = load_clip(folder)
    metric = CLIPScore(model_name_or_path=lambda: (Transformers5CLIP(model), processor))
    metric.update(images, prompts)
    return float(metric.compute())


def test_clip_score_equals_torchmetrics(toy_clip, paintings):
    images = paintings("kovra", SUBJECTS)
    prompts = [f"a painting of a {s} by kovra" for s in SUBJECTS]
    result = CLIPScorer(toy_clip)(images, prompts)
    assert result.value > 0  # the clamp is not what makes them equal
    assert result.value == pytest.approx(torchmetrics_score(toy_clip, images, prompts), rel=1e-4, abs=1e-4)


def test_each_pair_equals_torchmetrics_and_the_mean_is_clamped_at_zero(toy_clip, paintings):
    images = paintings("zenji", SUBJECTS[:3])
    prompts = ["a painting of a house by zenji", "a painting of a tree by kovra", "a photo"]
    scorer = CLIPScorer(toy_clip)
    per_image = scorer.scores(images, prompts)
    for image, prompt, score in zip(images, prompts, per_image):
        assert max(float(score), 0.0) == pytest.approx(torchmetrics_score(toy_clip, image[None], [prompt]), abs=1e-3)
    assert scorer(images, prompts).value == max(float(per_image.mean()), 0.0)


def test_the_matching_artist_scores_higher(toy_clip, paintings):
    images = paintings("dervo", SUBJECTS)
    scorer = CLIPScorer(toy_clip)
    right = scorer(images, [f"a painting of a {s} by dervo" for s in SUBJECTS]).value
    wrong = scorer(images, [f"a painting of a {s} by miska" for s in SUBJECTS]).value
    assert right > wrong


def test_prompt_count_must_match(toy_clip, paintings):
    with pytest.raises(FixativeError, match="one prompt per image"):
        CLIPScorer(toy_clip).scores(paintings("kovra", ["cat"]), ["a", "b"])
