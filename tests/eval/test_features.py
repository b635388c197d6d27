"""Feature extractors, image folders and the content-hash cache."""

import pytest
import torch
from PIL import Image

from fixative.core.errors import FixativeError
from fixative.eval.features import CLIPFeatures, folder_features, make_extractor


class CountingExtractor:
    """Mean colour per channel as 'features', counting its calls."""

    provenance = {"extractor": "mean colour (test)"}

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return images.float().mean((2, 3))


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def test_features_are_cached_by_content_not_by_name(tmp_path, paintings):
    images = paintings("kovra", ["house", "cat", "sun"])
    first = write_images(tmp_path / "a", images)
    extractor = CountingExtractor()
    features, record = folder_features(first, extractor, cache=tmp_path / "cache")
    assert record["cache"] == "miss" and extractor.calls == 1 and features.shape == (3, 3)
    assert torch.allclose(features, images.float().mean((2, 3)))
    copy = write_images(tmp_path / "b", images)  # same bytes elsewhere: a hit
    again, record = folder_features(copy, extractor, cache=tmp_path / "cache")
    assert record["cache"] == "hit" and extractor.calls == 1 and torch.equal(again, features)
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel
    write_images(copy, changed)
    _, record = folder_features(copy, extractor, cache=tmp_path / "cache")
    assert record["cache"] == "miss" and extractor.calls == 2


def test_unreadable_images_are_skipped_and_named(tmp_path, paintings):
    folder = write_images(tmp_path / "a", paintings("kovra", ["house", "cat"]))
    (folder / "zz.png").write_bytes(b"not a png")
    features, record = folder_features(folder, CountingExtractor())
    assert features.shape == (2, 3) and record["skipped"] == ["zz.png"] and record["images"] == 2


def test_clip_features_of_the_toy_clip_separate_artists(toy_clip, paintings):
    extractor = make_extractor(f"clip:{toy_clip}")
    assert isinstance(extractor, CLIPFeatures) and len(extractor.provenance["weights_sha256"]) == 64
    a = extractor(paintings("kovra", ["house", "cat", "sun", "tree"]))
    b = extractor(paintings("miska", ["house", "cat", "sun", "tree"]))
    assert a.shape == (4, 64)
    within = torch.nn.functional.cosine_similarity(a[:2], a[2:]).mean()
    across = torch.nn.functional.cosine_similarity(a, b).mean()
    assert within > across


def test_unknown_extractor_and_empty_folder_are_one_line_errors(tmp_path):
    with pytest.raises(FixativeError, match="unknown feature extractor"):
        make_extractor("vgg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FixativeError, match="no images"):
        folder_features(tmp_path / "empty", CountingExtractor())


def test_folder_sha256_reads_weight_files_once_through_the_cache(tmp_path, monkeypatch):
    import os

    from fixative.core import provenance
    from fixative.eval import features

    monkeypatch.setenv("FIXATIVE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(provenance, "_memory", {})
    read = []
    real = provenance.file_sha256

    def counting(path):
        read.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(provenance, "file_sha256", counting)
    monkeypatch.setattr(features, "file_sha256", counting)
    model = tmp_path / "model"
    model.mkdir()
    (model / "unet.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    first = features.folder_sha256(model)
    assert sorted(read) == ["config.json", "unet.safetensors"]
    read.clear()
    assert features.folder_sha256(model) == first
    assert read == ["config.json"]  # the weight file's hash came from the cache; the config is read again
    (model / "unet.safetensors").write_bytes(b"other weights")  # a changed weight file (size and time) is re-read
    assert features.folder_sha256(model) != first and "unet.safetensors" in read
