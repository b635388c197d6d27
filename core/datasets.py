"""Training images and captions for ``fine_tune``: in memory, an image folder, a LAION-style parquet.

Every source is an ``ImageSet``: a list of items (a caption, a bucket size, a content key) whose pixels
are produced on demand, resized and cropped to the item's bucket and flipped at random. Sizes and
readability are checked once when the set is built (a corrupt or unreadable image is skipped and
counted, never fatal), so the training loop only ever sees images that decode.

Aspect-ratio bucketing (as NovelAI and Waifu Diffusion train, NovelAI's "aspect ratio bucketing" note):
buckets are all (width, height) with sides multiples of ``step`` and an area between ``min_area_fraction``
and 1 times resolution²; each image goes to the bucket nearest its aspect ratio (log scale), is resized to
cover it and centre-cropped by the small excess. Images whose aspect is more than ``max_aspect_error`` from
every bucket, or that would be upscaled by more than ``max_upscale``, are skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FixativeError


@dataclass
class ImageCaptions:
    """In-memory training data: pixels (N, 3, H, W) in [-1, 1] and one caption per image."""

    pixels: torch.Tensor
    captions: Sequence[str]

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4 or self.pixels.shape[1] != 3:
            raise FixativeError(f"pixels must be (N, 3, H, W); got {tuple(self.pixels.shape)}")
        if len(self.captions) != len(self.pixels):
            raise FixativeError(f"{len(self.pixels)} images but {len(self.captions)} captions")


@dataclass
class ImageOptions:
    """How images become training pixels."""

    resolution: int | None = None  # None: in-memory pixels as given; files need it
    bucketing: bool = True  # aspect-ratio buckets; else a square crop of side ``resolution``
    random_crop: bool = False  # with bucketing off: a random square crop instead of the centre one
    random_flip: bool = False  # mirror horizontally with probability 1/2
    bucket_step: int = 64  # bucket sides are multiples of this (the VAE factor times the UNet's total downsampling)
    min_area_fraction: float = 0.75
    max_aspect_error: float = 0.1  # relative
    max_upscale: float = 2.0


def make_buckets(
    resolution: int, step: int, min_area_fraction: float = 0.75, max_aspect: float = 4.0
) -> list[tuple[int, int]]:
    """(width, height) pairs: sides multiples of ``step``, area within [min_area_fraction, 1] x resolution²."""
    area = resolution * resolution
    sides = range(step, int(resolution * math.sqrt(max_aspect)) // step * step + 1, step)
    return sorted(
        (w, h)
        for w in sides
        for h in sides
        if min_area_fraction * area <= w * h <= area and max(w / h, h / w) <= max_aspect
    )


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest the image's aspect ratio (log scale); of equally near ones, the largest."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


def fit(image, size: tuple[int, int], crop: str = "center", rng: random.Random | None = None):
    """Resize a PIL image to cover ``size`` (w, h) keeping its aspect, then crop to it (centre or random)."""
    from PIL import Image

    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    dx, dy = resized.width - width, resized.height - height
    if crop == "random":
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    else:
        left, top = dx // 2, dy // 2
    return resized.crop((left, top, left + width, top + height))


def to_pixels(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    """Shuffle a comma-separated tag caption, keeping the first ``keep`` tags in place."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(t for t in head + tail if t)


class ImageSet:
    """Items with a caption, a bucket (w, h) and a content key; ``pixels(i, rng)`` gives (3, h, w) in [-1, 1]."""

    captions: list[str]
    buckets: list[tuple[int, int]]  # per item
    skipped: Counter  # reason -> count

    def __len__(self) -> int:
        return len(self.captions)

    def pixels(self, index: int, rng: random.Random) -> torch.Tensor:
        raise NotImplementedError

    def key(self, index: int) -> str:
        """A content hash of the item's source and how it is turned into pixels (for latent caches)."""
        raise NotImplementedError

    def deterministic(self) -> bool:
        """Whether ``pixels`` ignores the rng (no random crop or flip): latents may then be cached."""
        raise NotImplementedError

    def groups(self) -> dict[tuple[int, int], list[int]]:
        """Item indices by bucket, buckets sorted."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(index)
        return dict(sorted(groups.items()))


class TensorImages(ImageSet):
    def __init__(self, data: ImageCaptions, random_flip: bool = False):
        self.data, self.random_flip = data, random_flip
        self.captions = list(data.captions)
        height, width = data.pixels.shape[-2:]
        self.buckets = [(width, height)] * len(self.captions)
        self.skipped = Counter()

    def pixels(self, index: int, rng: random.Random) -> torch.Tensor:
        pixels = self.data.pixels[index].float()
        return pixels.flip(-1) if self.random_flip and rng.random() < 0.5 else pixels

    def key(self, index: int) -> str:
        return hashlib.sha256(self.data.pixels[index].detach().cpu().float().numpy().tobytes()).hexdigest()

    def deterministic(self) -> bool:
        return not self.random_flip


class FileImages(ImageSet):
    """Images read by ``load(i) -> bytes`` (a file, a tar member, a parquet cell), checked when built."""

    def __init__(
        self,
        loaders: Sequence[Callable[[], bytes]],
        captions: Sequence[str],
        options: ImageOptions,
        names: Sequence[str] | None = None,
    ):
        from PIL import Image

        if options.resolution is None:
            raise FixativeError("training from image files needs a resolution")
        self.options = options
        self.skipped = Counter()
        bucket_list = (
            make_buckets(options.resolution, options.bucket_step, options.min_area_fraction)
            if options.bucketing
            else [(options.resolution, options.resolution)]
        )
        self._loaders, self.captions, self.buckets, self._hashes = [], [], [], []
        for load, caption in zip(loaders, captions):
            try:
                data = load()
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
                    size = image.size
            except Exception:  # noqa: BLE001 - any decoder failure means "unreadable"; it is counted
                self.skipped["unreadable"] += 1
                continue
            bucket = choose_bucket(*size, bucket_list) if options.bucketing else bucket_list[0]
            if options.bucketing and abs(math.log((size[0] / size[1]) / (bucket[0] / bucket[1]))) > math.log1p(
                options.max_aspect_error
            ):
                self.skipped["aspect ratio far from every bucket"] += 1
                continue
            if max(bucket[0] / size[0], bucket[1] / size[1]) > options.max_upscale:
                self.skipped[f"smaller than 1/{options.max_upscale:g} of its bucket"] += 1
                continue
            self._loaders.append(load)
            self.captions.append(str(caption))
            self.buckets.append(bucket)
            self._hashes.append(hashlib.sha256(data).hexdigest())
        self.names = names

    def image(self, index: int, rng: random.Random | None = None):
        from PIL import Image

        with Image.open(io.BytesIO(self._loaders[index]())) as image:
            image = image.convert("RGB")
        crop = "random" if self.options.random_crop and not self.options.bucketing else "center"
        image = fit(image, self.buckets[index], crop, rng)
        if self.options.random_flip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image

    def pixels(self, index: int, rng: random.Random) -> torch.Tensor:
        return to_pixels(self.image(index, rng))

    def key(self, index: int) -> str:
        w, h = self.buckets[index]
        return hashlib.sha256(f"{self._hashes[index]}:{w}x{h}:bicubic-center".encode()).hexdigest()

    def deterministic(self) -> bool:
        return not (self.options.random_flip or (self.options.random_crop and not self.options.bucketing))


def _file_loader(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def image_folder(
    folder: str | Path, options: ImageOptions, caption_column: str = "text", split: str | None = None
) -> FileImages:
    """An ``imagefolder`` data set (images plus ``metadata.jsonl`` / ``metadata.csv``, read with ``datasets``);
    ``split``: a sub-folder such as ``train`` (default: ``train`` when the folder has one)."""
    import datasets

    folder = Path(folder)
    if not folder.is_dir():
        raise FixativeError(f"data folder {folder} does not exist")
    if split is None and (folder / "train").is_dir():
        split = "train"
    root = folder / split if split else folder
    if not any((root / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):
        raise FixativeError(f"{root} has no metadata.jsonl or metadata.csv with captions")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    if caption_column not in dataset.column_names:
        raise FixativeError(f"{root}: no caption column {caption_column!r}; it has {', '.join(dataset.column_names)}")
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    paths = [Path(row["path"]) for row in dataset["image"]]
    return FileImages([_file_loader(p) for p in paths], dataset[caption_column], options, names=[str(p) for p in paths])


# ---------------------------------------------------------------- LAION-style metadata


@dataclass
class MetadataFilters:
    """Row filters of a LAION-style parquet, applied to the metadata before any image is read (None: off)."""

    min_width: int | None = None  # WIDTH >= (the original image's size, as LAION records it)
    min_height: int | None = None  # HEIGHT >=
    min_similarity: float | None = None  # similarity >= (CLIP image-text cosine)
    max_watermark: float | None = None  # pwatermark <= (predicted watermark probability)
    max_unsafe: float | None = None  # punsafe <= (predicted NSFW probability)

    def rules(self) -> list[tuple[str, str, str, float]]:
        """(option name, column, comparison, value) of the filters that are on, in order."""
        table = [
            ("min_width", "WIDTH", ">="),
            ("min_height", "HEIGHT", ">="),
            ("min_similarity", "similarity", ">="),
            ("max_watermark", "pwatermark", "<="),
            ("max_unsafe", "punsafe", "<="),
        ]
        return [
            (name, column, op, getattr(self, name)) for name, column, op in table if getattr(self, name) is not None
        ]


def filter_metadata(columns: dict[str, list], filters: MetadataFilters) -> tuple[list[int], list[tuple[str, int]]]:
    """Row indices that pass every filter, and (option, rows it removed) per filter in order. A missing
    value (null) fails its filter."""
    import numpy as np

    rows = len(next(iter(columns.values()))) if columns else 0
    keep = np.ones(rows, dtype=bool)
    removed = []
    for name, column, op, value in filters.rules():
        if column not in columns:
            raise FixativeError(
                f"--{name.replace('_', '-')} needs a {column!r} column; the parquet has {', '.join(columns)}"
            )
        values = np.array([np.nan if v is None else float(v) for v in columns[column]], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            passes = values >= value if op == ">=" else values <= value
        before = int(keep.sum())
        keep &= passes
        removed.append((name, before - int(keep.sum())))
    return [int(i) for i in np.flatnonzero(keep)], removed


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def img2dataset_images(source: str | Path) -> dict[str, Callable[[], bytes]]:
    """URL -> loader of the images img2dataset wrote to ``source``: a folder of ``.tar`` shards
    (WebDataset) or of files (``--output_format files``), each image beside a ``.json`` holding its ``url``."""
    import json
    import tarfile

    source = Path(source)
    if not source.is_dir():
        raise FixativeError(f"image folder {source} does not exist")
    images: dict[str, Callable[[], bytes]] = {}
    for shard in sorted(source.rglob("*.tar")):
        members: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, suffix = member.name.rsplit(".", 1) if "." in member.name else (member.name, "")
                entry = members.setdefault(stem, {})
                if suffix == "json":
                    entry["url"] = json.loads(tar.extractfile(member).read()).get("url")
                elif "." + suffix.lower() in IMAGE_SUFFIXES:
                    entry["image"] = (member.offset_data, member.size)
        for entry in members.values():
            if entry.get("url") and "image" in entry:
                images[entry["url"]] = _tar_loader(shard, *entry["image"])
    for sidecar in sorted(source.rglob("*.json")):
        for suffix in IMAGE_SUFFIXES:
            image = sidecar.with_suffix(suffix)
            if image.is_file():
                try:
                    url = json.loads(sidecar.read_text()).get("url")
                except (ValueError, OSError):
                    break
                if url:
                    images[url] = _file_loader(image)
                break
    return images


def _tar_loader(shard: Path, offset: int, size: int) -> Callable[[], bytes]:
    def load() -> bytes:
        with open(shard, "rb") as file:
            file.seek(offset)
            return file.read(size)

    return load


def captioned_images(
    data: str | Path,
    images: str | Path | None,
    options: ImageOptions,
    caption_column: str | None = None,
    filters: MetadataFilters | None = None,
    log: Callable[[str], None] = print,
) -> ImageSet:
    """What ``--data`` names: a LAION-style ``.parquet`` (images from ``images``, img2dataset's output; caption
    column default ``TEXT``; ``filters`` applied) or an image folder (caption column default ``text``)."""
    data = Path(data)
    if data.suffix == ".parquet":
        if images is None:
            raise FixativeError("a parquet holds metadata only; give --images (img2dataset's output folder)")
        return laion_parquet(data, images, options, caption_column or "TEXT", filters or MetadataFilters(), log=log)
    if filters is not None and filters.rules():
        raise FixativeError("--min-width/--min-height/--min-similarity/--max-watermark/--max-unsafe filter a parquet")
    return image_folder(data, options, caption_column or "text")


def laion_parquet(
    path: str | Path,
    images: str | Path,
    options: ImageOptions,
    caption_column: str = "TEXT",
    filters: MetadataFilters = MetadataFilters(),
    log: Callable[[str], None] = print,
) -> FileImages:
    """A LAION-style metadata parquet (``URL``, ``TEXT``, ``WIDTH``, ``HEIGHT``, ``similarity``, ``pwatermark``,
    ``punsafe``), filtered on the metadata, with images found by URL in img2dataset's output ``images``."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FixativeError(f"parquet file {path} does not exist")
    table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    names = table.column_names
    for column in (caption_column, "URL"):
        if column not in names:
            raise FixativeError(f"{path} has no {column!r} column; it has {', '.join(names)}")
    needed = {column for _, column, _, _ in filters.rules()} | {caption_column, "URL"}
    columns = {name: table[name] for name in names if name in needed}
    kept, removed = filter_metadata(columns, filters)
    by_url = img2dataset_images(images)
    rows = [i for i in kept if columns["URL"][i] in by_url]
    log(
        f"parquet {path.name}: {len(table)} rows; "
        + "".join(f"--{n.replace('_', '-')} removed {c}; " for n, c in removed)
        + f"{len(kept)} kept, {len(rows)} with an image in {images}"
    )
    urls = [columns["URL"][i] for i in rows]
    return FileImages([by_url[u] for u in urls], [columns[caption_column][i] for i in rows], options, names=urls)
