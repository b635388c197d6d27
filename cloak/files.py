"""An artist's files in and out: any size and mode, alpha / ICC profile / EXIF kept, written atomically.

The model sees RGB pixels in [0, 1] in display orientation (EXIF orientation applied); the output is written in the
input's mode (grayscale, palette, 16-bit, CMYK are converted for the model and converted back) with its alpha
channel untouched, its ICC profile and EXIF (orientation reset to 1: the pixels are already upright). ``restore``
runs exactly the conversion the output file will hold, so the budget is measured on what is stored.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fixative.core.errors import FixativeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
OUTPUT_FORMATS = ("png", "jpeg")
EXIF_ORIENTATION = 0x0112


@dataclass
class Artwork:
    path: Path | None
    pixels: torch.Tensor  # (1, 3, H, W) in [0, 1], display orientation
    mode: str  # the input's PIL mode
    alpha: np.ndarray | None = None  # (H, W) as stored, untouched
    icc_profile: bytes | None = None
    exif: bytes | None = None
    levels: int = 255  # 65535 for 16-bit inputs
    notes: list[str] = field(default_factory=list)

    @property
    def grey(self) -> bool:
        return self.mode in ("L", "LA", "I;16", "I;16B", "I;16L", "I", "1")


def read_caption(path: str | Path) -> str | None:
    """An image's caption, as fine-tuning data sets give it: ``IMAGE.txt`` beside it, else the ``text`` of its line
    in ``metadata.jsonl`` in its folder (``file_name`` relative to that folder); None when neither has one."""
    path = Path(path)
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    metadata = path.parent / "metadata.jsonl"
    if metadata.is_file():
        return _metadata_captions(metadata, metadata.read_text(encoding="utf-8")).get(path.name)
    return None


@functools.lru_cache(maxsize=8)
def _metadata_captions(metadata: Path, text: str) -> dict[str, str]:
    """{file_name: text} of a metadata.jsonl's ``text``, parsed once per folder and content, not once per image."""
    captions = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise FixativeError(f"{metadata}, line {number}: not JSON ({error.msg})") from None
        if "text" in row:
            captions.setdefault(Path(str(row.get("file_name", ""))).as_posix(), str(row["text"]).strip())
    return captions


def find_images(inputs: list[str | Path]) -> list[tuple[Path, Path]]:
    """(file, path relative to its input) for every file given and every image file under every folder given."""
    found = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found += [
                (p, p.relative_to(item))
                for p in sorted(item.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ]
        elif item.exists():
            found.append((item, Path(item.name)))
        else:
            raise FixativeError(f"{item}: no such file or folder")
    return found


def read_artwork(path: str | Path) -> Artwork:
    """Read an image file of any common mode, or raise a one-line FixativeError."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return artwork_from_image(image, path)
    except Image.DecompressionBombError:
        raise FixativeError(
            f"{path}: image too large for Pillow's safety limit (about 179 M pixels); split it into parts first"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise FixativeError(f"cannot read image {path}: {error.__class__.__name__}: {error}") from None


def artwork_from_image(image: Image.Image, path: Path | None = None) -> Artwork:
    mode = image.mode
    icc_profile = image.info.get("icc_profile")
    exif = image.getexif()
    upright = ImageOps.exif_transpose(image)
    if EXIF_ORIENTATION in exif:
        exif[EXIF_ORIENTATION] = 1
    exif_bytes = exif.tobytes() if len(exif) else None
    notes, alpha, levels = [], None, 255
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(upright, dtype=np.float64)
        levels = 65535
        grey = np.clip(values, 0, levels) / levels
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:
        if mode == "P":
            upright = upright.convert("RGBA" if "transparency" in upright.info else "RGB")
            notes.append("palette image: cloaked in RGB and quantised back to a palette")
        elif mode == "CMYK":
            notes.append("CMYK image: cloaked in RGB (Pillow's conversion) and written back as CMYK TIFF")
        elif mode not in ("RGB", "RGBA", "L", "LA"):
            notes.append(f"{mode} image: cloaked and written as RGB")
        if upright.mode in ("RGBA", "LA"):
            alpha = np.asarray(upright.getchannel("A")).copy()
        rgb = np.asarray(upright.convert("RGB"), dtype=np.float64) / 255
    pixels = torch.from_numpy(rgb).float().permute(2, 0, 1)[None].contiguous()
    return Artwork(path, pixels, mode, alpha, icc_profile, exif_bytes, levels, notes)


def output_suffix(artwork: Artwork, output_format: str) -> str:
    if artwork.mode == "CMYK":
        return ".tif"
    return ".jpg" if output_format == "jpeg" else ".png"


def to_image(artwork: Artwork, pixels: torch.Tensor) -> Image.Image:
    """Stored pixels (1, 3, H, W) in [0, 1] -> the output image in the input's mode, alpha restored."""
    rgb = pixels[0].permute(1, 2, 0).clamp(0, 1).cpu().double().numpy()
    if artwork.levels == 65535:
        return Image.fromarray(np.round(rgb[..., 0] * 65535).astype(np.uint16))  # mode I;16
    rgb8 = np.round(rgb * 255).astype(np.uint8)
    if artwork.grey:
        image = Image.fromarray(rgb8[..., 0])
        if artwork.mode == "1":
            return image.convert("1")
    else:
        image = Image.fromarray(rgb8)
    if artwork.alpha is not None:
        image.putalpha(Image.fromarray(artwork.alpha))
    if artwork.mode == "P":
        method = Image.Quantize.FASTOCTREE if image.mode == "RGBA" else Image.Quantize.MEDIANCUT
        return image.quantize(colors=256, method=method, dither=Image.Dither.NONE)
    if artwork.mode == "CMYK":
        return image.convert("CMYK")
    return image


def _save(image: Image.Image, file, artwork: Artwork, output_format: str) -> None:
    extra = {}
    if artwork.icc_profile:
        extra["icc_profile"] = artwork.icc_profile
    if artwork.exif:
        extra["exif"] = artwork.exif
    if artwork.mode == "CMYK":
        image.save(file, format="TIFF", compression="tiff_lzw", **extra)
    elif output_format == "jpeg":
        image.convert("RGB").save(file, format="JPEG", quality=95, subsampling=0, **extra)
    else:
        image.save(file, format="PNG", **extra)


def restorer(artwork: Artwork, output_format: str = "png") -> Callable[[torch.Tensor], torch.Tensor]:
    """pixels (1, 3, H, W) in [0, 1] -> the RGB pixels the output file will hold (encoded and read back)."""

    def restore(pixels: torch.Tensor) -> torch.Tensor:
        out = []
        for row in pixels:
            buffer = io.BytesIO()
            _save(to_image(artwork, row[None]), buffer, artwork, output_format)
            buffer.seek(0)
            with Image.open(buffer) as stored:
                out.append(artwork_from_image(stored).pixels.to(pixels.device))
        return torch.cat(out)

    return restore


def write_artwork(artwork: Artwork, pixels: torch.Tensor, path: str | Path, output_format: str = "png") -> Path:
    """Write stored pixels as ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            _save(to_image(artwork, pixels), file, artwork, output_format)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> None:
    """Atomic text write (records, summaries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
