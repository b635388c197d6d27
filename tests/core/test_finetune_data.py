"""Training data: image folders, LAION-style parquet filters, img2dataset shards, buckets, corrupt images."""

import io
import json
import math
import random
import tarfile

import pytest
import torch
from PIL import Image

from fixative.core.datasets import (
    FileImages,
    ImageOptions,
    MetadataFilters,
    filter_metadata,
    image_folder,
    laion_parquet,
    make_buckets,
    shuffle_tags,
)
from fixative.core.errors import FixativeError


def png_bytes(width, height, seed=0):
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_filters_keep_exactly_the_expected_rows():
    columns = {
        "WIDTH": [512, 300, 1024, 800, None, 640],
        "HEIGHT": [512, 600, 200, 800, 512, 640],
        "similarity": [0.30, 0.35, 0.40, 0.20, 0.33, 0.31],
        "pwatermark": [0.1, 0.2, 0.1, 0.1, 0.1, 0.9],
        "punsafe": [0.0, 0.0, 0.0, 0.0, 0.0, 0.05],
    }
    filters = MetadataFilters(min_width=400, min_height=256, min_similarity=0.28, max_watermark=0.5, max_unsafe=0.1)
    kept, removed = filter_metadata(columns, filters)
    # row 1: too narrow; 4: width unknown; 2: too short; 3: dissimilar; 5: watermark
    assert kept == [0]
    assert removed == [
        ("min_width", 2),
        ("min_height", 1),
        ("min_similarity", 1),
        ("max_watermark", 1),
        ("max_unsafe", 0),
    ]
    assert filter_metadata(columns, MetadataFilters()) == ([0, 1, 2, 3, 4, 5], [])
    with pytest.raises(FixativeError, match="punsafe"):
        filter_metadata({"WIDTH": [1]}, MetadataFilters(max_unsafe=0.1))


def write_img2dataset_shard(path, rows):
    """A WebDataset shard as img2dataset writes it: NNN.jpg/.png, NNN.txt, NNN.json with the url."""
    with tarfile.open(path, "w") as tar:
        for key, (url, data) in enumerate(rows):
            for suffix, content in ((".png", data), (".txt", b"caption"), (".json", json.dumps({"url": url}).encode())):
                info = tarfile.TarInfo(f"{key:09d}{suffix}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def test_laion_parquet_reads_the_filtered_rows_from_tar_shards_and_counts_what_it_skips(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    urls = [f"https://example.com/{i}.png" for i in range(5)]
    table = pa.table(
        {
            "URL": urls,
            "TEXT": [f"caption {i}" for i in range(5)],
            "WIDTH": [64, 64, 16, 64, 64],
            "HEIGHT": [64, 64, 16, 64, 64],
            "similarity": [0.3] * 5,
            "pwatermark": [0.1, 0.1, 0.1, 0.9, 0.1],
            "punsafe": [0.0] * 5,
        }
    )
    pq.write_table(table, tmp_path / "meta.parquet")
    shards = tmp_path / "images"
    shards.mkdir()
    # url 1 is a corrupt image; url 4 was never downloaded
    write_img2dataset_shard(
        shards / "00000.tar",
        [
            (urls[0], png_bytes(64, 64)),
            (urls[1], b"\x89PNG not really"),
            (urls[2], png_bytes(16, 16)),
            (urls[3], png_bytes(64, 64)),
        ],
    )
    lines = []
    images = laion_parquet(
        tmp_path / "meta.parquet",
        shards,
        ImageOptions(resolution=64, bucket_step=32),
        filters=MetadataFilters(min_width=32, max_watermark=0.5),
        log=lines.append,
    )
    assert "5 rows" in lines[0] and "--min-width removed 1" in lines[0] and "--max-watermark removed 1" in lines[0]
    assert "3 kept, 2 with an image" in lines[0]
    assert images.captions == ["caption 0"] and images.skipped == {"unreadable": 1}
    assert images.pixels(0, random.Random(0)).shape == (3, 64, 64)
    with pytest.raises(FixativeError, match="no 'caption' column; it has URL, TEXT"):
        laion_parquet(tmp_path / "meta.parquet", shards, ImageOptions(resolution=64), caption_column="caption")


def test_buckets_keep_the_aspect_within_ten_percent_and_do_not_upscale_beyond_the_limit():
    """At SD's ratio of resolution to bucket step (512 / 64), scaled down to 128 / 16."""
    resolution, step = 128, 16
    buckets = make_buckets(resolution, step)
    assert all(w % step == 0 and h % step == 0 and 0.75 * resolution**2 <= w * h <= resolution**2 for w, h in buckets)
    rng = random.Random(0)
    sizes = [(rng.randint(40, 400), rng.randint(40, 400)) for _ in range(150)]
    options = ImageOptions(resolution=resolution, bucket_step=step, max_upscale=1.5)
    images = FileImages([lambda w=w, h=h: png_bytes(w, h) for w, h in sizes], [f"{w}x{h}" for w, h in sizes], options)
    assert len(images) + sum(images.skipped.values()) == len(sizes)
    for caption, (bucket_w, bucket_h) in zip(images.captions, images.buckets):
        width, height = map(int, caption.split("x"))
        assert abs(math.log((width / height) / (bucket_w / bucket_h))) <= math.log(1.1), (width, height)
        assert max(bucket_w / width, bucket_h / height) <= 1.5
    moderate = [(w, h) for w, h in sizes if max(w / h, h / w) <= 2 and min(w, h) >= 128]
    kept = set(images.captions)
    assert sum(f"{w}x{h}" in kept for w, h in moderate) == len(moderate)  # no image of usual shape and size is lost
    assert set(images.skipped) <= {"aspect ratio far from every bucket", "smaller than 1/1.5 of its bucket"}
    assert images.pixels(0, random.Random(0)).shape[1:] == images.buckets[0][::-1]


def test_image_folder_skips_and_counts_corrupt_and_too_small_images_and_buckets_the_rest(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for name, data in (
        ("wide.png", png_bytes(96, 48)),
        ("square.png", png_bytes(64, 64)),
        ("broken.png", png_bytes(64, 64)[:40]),
        ("tiny.png", png_bytes(8, 8)),
        ("tall.png", png_bytes(48, 96)),
    ):
        (folder / name).write_bytes(data)
        rows.append({"file_name": name, "text": name.split(".")[0]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = image_folder(folder, ImageOptions(resolution=64, bucket_step=8, max_upscale=2.0))
    assert sorted(images.captions) == ["square", "tall", "wide"]
    assert images.skipped == {"unreadable": 1, "smaller than 1/2 of its bucket": 1}
    for index, caption in enumerate(images.captions):
        width, height = images.buckets[index]
        assert {"wide": width > height, "tall": height > width, "square": width == height}[caption]
        assert images.pixels(index, random.Random(0)).shape == (3, height, width)
    with pytest.raises(FixativeError, match="no caption column 'caption'; it has"):
        image_folder(folder, ImageOptions(resolution=64), caption_column="caption")


def test_fine_tune_trains_on_a_folder_with_a_corrupt_image(tmp_path):
    from fixative.core.finetune import FinetuneConfig, fine_tune
    from fixative.core.model import StableDiffusionModel
    from fixative.core.presets import get_preset

    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i in range(4):
        name = f"{i}.png"
        (folder / name).write_bytes(png_bytes(16, 16, seed=i) if i != 2 else b"garbage")
        rows.append({"file_name": name, "text": f"image {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = get_preset("tiny-sd1")
    model = StableDiffusionModel.from_config(preset.model_config, preset.scheduler_config)
    lines = []
    config = FinetuneConfig(
        max_steps=2,
        batch_size=2,
        image=ImageOptions(resolution=16, bucket_step=8),
        cache_latents=True,
        cache_dir=str(tmp_path / "cache"),
    )
    fine_tune(model, folder, config, progress=False, log=lines.append)
    assert lines == ["fine-tune: 3 images; skipped; 1 unreadable"]
    assert len(list((tmp_path / "cache").glob("latents-*.pt"))) == 3  # cached by content hash for the next run
    assert 1 <= len(list((tmp_path / "cache").glob("text-*.pt"))) <= 3  # one per caption drawn

    def no_encoding(pixels):
        raise AssertionError("the next run must read the cached latents")

    model.vae.encode = no_encoding
    fine_tune(model, folder, config, progress=False, log=lambda _: None)


def test_shuffle_tags_keeps_the_first_tags():
    caption = "zenji, painting, stripes, pink, sky, sea"
    shuffled = {shuffle_tags(caption, 2, random.Random(seed)) for seed in range(20)}
    assert len(shuffled) > 1
    for text in shuffled:
        tags = text.split(", ")
        assert tags[:2] == ["zenji", "painting"] and sorted(tags) == sorted(caption.split(", "))


def test_in_memory_pixels_must_match_captions():
    from fixative.core.datasets import ImageCaptions

    with pytest.raises(FixativeError, match="3 images but 2 captions"):
        ImageCaptions(torch.zeros(3, 3, 8, 8), ["a", "b"])
