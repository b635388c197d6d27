"""Image features for distribution metrics: pluggable extractors, image folders, and a cache keyed by content.

An extractor maps uint8 images (B, 3, H, W) to features (B, d) and says what it is (``provenance``): the FID
Inception (the standard for FID / KID), or the image tower of any transformers ``CLIPModel`` folder (the toy
CLIP is one). Features of a set of files are cached under the SHA-256 of the extractor's identity and of
every file's bytes, so a renamed folder hits the cache and a changed pixel or weight misses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from fixative.core.errors import FixativeError
from fixative.core.provenance import WEIGHT_SUFFIXES, file_sha256, sha256

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FeatureExtractor(Protocol):
    provenance: dict  # what produces the features: kind, weights file(s) and their SHA-256

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def folder_sha256(folder: str | Path, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".pth", ".json")) -> str:
    """One hash over a folder's files with ``suffixes`` (names and bytes): by default a model folder's weight and
    config files. Weight files are hashed through core's cache (by path, size and modification time: read once);
    everything else (configs, images) is read each time."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in suffixes):
        file_hash = sha256(path) if path.suffix in WEIGHT_SUFFIXES else file_sha256(path)
        digest.update(f"{path.relative_to(folder)}:{file_hash}\n".encode())
    return digest.hexdigest()


class InceptionFeatures:
    """Pool features (2048) of the FID Inception (eval/inception.py)."""

    def __init__(self, weights: str | Path | None = None, device: torch.device | str = "cpu"):
        from .inception import find_weights, load_fid_inception

        path = find_weights(weights)
        self.network = load_fid_inception(path, device)
        self.device = torch.device(device)
        self.provenance = {
            "extractor": "fid-inception-v3 (pt_inception-2015-12-05, TF1 bilinear resize to 299)",
            "weights": str(path),
            "weights_sha256": file_sha256(path),
        }

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images.to(self.device)).cpu()


def load_clip(folder: str | Path, device: torch.device | str = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local transformers folder, float32, or a one-line error."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FixativeError(
            f"no CLIP model in {folder}: give a folder saved by transformers' "
            "CLIPModel.save_pretrained (config.json, weights, tokenizer, preprocessor_config.json)"
        )
    model = transformers.CLIPModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    return model, processor


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected image embedding (transformers 5 returns an output object, 4.x a tensor)."""
    output = model.get_image_features(pixel_values=pixel_values)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    output = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPFeatures:
    """Projected image embeddings of a transformers CLIP, preprocessed by the folder's own image processor."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model, self.processor = load_clip(folder, self.device)
        self.provenance = {
            "extractor": "clip image embedding (transformers CLIPModel.get_image_features)",
            "weights": str(folder),
            "weights_sha256": folder_sha256(folder),
        }

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixel_values = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return image_embeddings(self.model, pixel_values.to(self.device)).float().cpu()


def make_extractor(
    spec: str, inception_weights: str | Path | None = None, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """``inception`` or ``clip:FOLDER`` (``clip:toy`` = the toy world's CLIP)."""
    if spec == "inception":
        return InceptionFeatures(inception_weights, device)
    if spec.startswith("clip:"):
        folder = spec[len("clip:") :]
        if folder == "toy":
            from fixative.core.toy import clip_folder

            folder = clip_folder()
        return CLIPFeatures(folder, device)
    raise FixativeError(f"unknown feature extractor {spec!r}: use 'inception' or 'clip:FOLDER' (or 'clip:toy')")


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, in file-name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FixativeError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FixativeError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_uint8(path: str | Path) -> torch.Tensor | None:
    """An image file as uint8 (3, H, W) RGB, or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def pixels_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8, rounded (as saving a PNG does)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def extract(images: list[torch.Tensor], extractor: FeatureExtractor, batch_size: int = 32) -> torch.Tensor:
    """Features (N, d) of uint8 images (3, H, W); consecutive images of one size are batched together."""
    features, start = [], 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < batch_size and images[end].shape == images[start].shape:
            end += 1
        features.append(extractor(torch.stack(images[start:end])).float())
        start = end
    return torch.cat(features)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def folder_features(
    folder: str | Path,
    extractor: FeatureExtractor,
    cache: str | Path | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Features of every readable image in ``folder`` (file-name order) and a record of what was read:
    the folder, its images' combined hash, the unreadable files skipped, and whether the cache answered."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    files = image_files(folder)
    hashes = [file_sha256(p) for p in files]
    identity = json.dumps(extractor.provenance, sort_keys=True) + "\n" + "\n".join(hashes)
    key = hashlib.sha256(identity.encode()).hexdigest()
    record = {
        "folder": str(folder),
        "images": len(files),
        "images_sha256": hashlib.sha256("\n".join(hashes).encode()).hexdigest(),
        "skipped": [],
    }
    path = Path(cache) / f"{key}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        with safe_open(path, "pt") as file:
            features, skipped = file.get_tensor("features"), json.loads(file.metadata()["skipped"])
        record.update(images=len(files) - len(skipped), skipped=skipped, cache="hit")
        return features, record
    images, skipped = [], []
    for file in tqdm(files, desc=f"reading {Path(folder).name}", disable=not progress):
        image = read_uint8(file)
        if image is None:
            skipped.append(file.name)
        else:
            images.append(image)
    if not images:
        raise FixativeError(f"none of the {len(files)} images in {folder} could be read")
    features = extract(images, extractor, batch_size)
    record.update(images=len(images), skipped=skipped, cache="miss" if path is not None else "off")
    if path is not None:
        _atomic_save(
            {"features": features.contiguous()},
            path,
            {"provenance": json.dumps(extractor.provenance), "skipped": json.dumps(skipped)},
        )
    return features, record


def default_cache() -> Path:
    """``$FIXATIVE_HOME/eval/features``."""
    from fixative.core.toy import fixative_home

    return fixative_home() / "eval" / "features"
