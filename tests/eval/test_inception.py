"""The FID Inception: torch-fidelity's network on the same (random) weights, the TF1 resize, missing weights."""

import pytest
import torch

from fixative.core.errors import FixativeError
from fixative.eval.inception import find_weights, load_fid_inception, tf1_resize_bilinear


def test_resize_equals_torch_fidelitys_tensorflow_resize():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = torch.rand(2, 3, 37, 64) * 255
    expected = interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299), align_corners=False)
    assert torch.allclose(tf1_resize_bilinear(images, 299), expected, atol=1e-4)
    # and it is not torch's half-pixel bilinear resize
    assert not torch.allclose(
        torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear"), expected, atol=1e-2
    )


@pytest.mark.slow
def test_features_equal_torch_fidelity_on_the_same_random_weights(random_inception_file):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = load_fid_inception(random_inception_file)
    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(random_inception_file)
    )
    images = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    features = ours(images)
    assert features.shape == (2, 2048) and features.std() > 0.05  # not a degenerate network
    assert torch.allclose(features, theirs(images)[0], atol=1e-4)


def test_missing_inception_file_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FixativeError) as error:
        find_weights()
    message = str(error.value)
    assert "\n" not in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path / "hub") in message
    with pytest.raises(FixativeError, match="not found at"):
        find_weights(tmp_path / "nope.pth")


def test_weights_are_found_in_the_torch_hub_cache(tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"torch-fidelity's name for the file")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert find_weights() == checkpoints / "weights-inception-2015-12-05-6726825d.pth"


def test_a_foreign_weights_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(FixativeError, match="is not the FID Inception"):
        load_fid_inception(path)
