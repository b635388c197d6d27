"""Images and masks in and out of the pipelines: PIL <-> tensors, PNG files with settings, outpainting canvases.

Conventions: ``pixels`` are (B, 3, H, W) float tensors in [-1, 1] (what the VAE reads and writes);
``images`` are PIL images or (B, 3, H, W) tensors in [0, 1]; ``masks`` are white (1) where the model
paints and black (0) where the input image is kept, as in diffusers' inpainting pipelines.
Resizing and binarising follow diffusers' ``VaeImageProcessor`` so the same inputs give the same tensors.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import FixativeError


def _open_image(path: str | Path, mode: str, what: str, hint: str) -> Image.Image:
    """Read an image file converted to ``mode``, or raise a one-line FixativeError.

    Pillow's decompression-bomb guard stays on: an image above ``Image.MAX_IMAGE_PIXELS`` is refused (Pillow
    only warns up to twice that; here the warning is an error too), naming its size and the limit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        raise FixativeError(
            f"{what} {path} has {size}, above Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
            f"(a guard against decompression bombs); give a smaller image"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise FixativeError(f"cannot read {what} {path}: {error.__class__.__name__}; {hint}") from None


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB, or raise a one-line FixativeError."""
    return _open_image(path, "RGB", "image", "give a PNG or JPEG file")


def load_mask(path: str | Path) -> Image.Image:
    """Read a mask file as 8-bit grayscale (white = repaint), or raise a one-line FixativeError."""
    return _open_image(path, "L", "mask", "give a PNG file")


def default_size(image: Image.Image | torch.Tensor, multiple: int) -> tuple[int, int]:
    """(height, width) of an image, rounded down to a multiple of the VAE's down-sampling factor."""
    height, width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[-2:]
    return height - height % multiple, width - width % multiple


def _as_list(images):
    return list(images) if isinstance(images, (list, tuple)) else [images]


def images_to_tensor(images, height: int, width: int, grayscale: bool = False) -> torch.Tensor:
    """PIL image(s) or a [0, 1] tensor -> (B, C, height, width) float32 in [0, 1] (C = 1 if grayscale else 3).

    PIL images are resized with Lanczos, tensors with nearest-neighbour interpolation (diffusers' choices).
    """
    if isinstance(images, torch.Tensor):
        tensor = images.float()
        if grayscale and tensor.ndim == 3:
            tensor = tensor.unsqueeze(1)  # (B, H, W) mask
        elif tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)  # (3, H, W) image
        if tensor.shape[-2:] != (height, width):
            tensor = torch.nn.functional.interpolate(tensor, size=(height, width))
        return tensor
    arrays = []
    for image in _as_list(images):
        image = image.convert("L" if grayscale else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
        arrays.append(np.asarray(image).astype(np.float32) / 255.0)
    array = np.stack(arrays)  # (B, H, W) or (B, H, W, 3)
    array = array[..., None] if grayscale else array
    return torch.from_numpy(array.transpose(0, 3, 1, 2).copy())


def images_to_pixels(images, height: int, width: int) -> torch.Tensor:
    """PIL image(s) or a [0, 1] tensor -> pixels (B, 3, height, width) in [-1, 1], float32."""
    return images_to_tensor(images, height, width) * 2.0 - 1.0


def masks_to_tensor(masks, height: int, width: int) -> torch.Tensor:
    """PIL mask(s) or a [0, 1] tensor -> (B, 1, height, width) float32 in {0, 1}: 1 where the model paints."""
    mask = images_to_tensor(masks, height, width, grayscale=True)
    return (mask >= 0.5).float()


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels (B, 3, H, W) in [-1, 1] -> RGB PIL images (rounded to uint8 as diffusers does)."""
    images = pixels_to_unit(pixels).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(array) for array in (images * 255).round().astype(np.uint8)]


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> images in [0, 1] (clamped)."""
    return (pixels * 0.5 + 0.5).clamp(0, 1)


def pad_for_outpainting(
    image: Image.Image,
    left: int = 0,
    top: int = 0,
    right: int = 0,
    bottom: int = 0,
    multiple: int = 8,
    fill: tuple[int, int, int] = (127, 127, 127),
) -> tuple[Image.Image, Image.Image]:
    """Outpainting as inpainting: pad ``image`` by the given margins (in pixels) and build the mask.

    The canvas is grown further on the right and bottom so that both sides are multiples of ``multiple``.
    Returns (canvas, mask): the original pixels keep mask 0 (kept), the new border gets 255 (painted).
    """
    if min(left, top, right, bottom) < 0:
        raise FixativeError("outpainting margins must be >= 0 pixels")
    width = image.width + left + right
    height = image.height + top + bottom
    width += -width % multiple
    height += -height % multiple
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``image`` as a PNG with ``metadata`` as text chunks, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            image.save(file, format="PNG", pnginfo=info)
        os.chmod(temporary, _default_file_mode())  # mkstemp creates 0600; give the file the umask's usual mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
