"""Labelled image grids for reports: one row per label, one column per image."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw


def labelled_grid(rows: list[torch.Tensor], labels: list[str], label_width: int, text_offset: int) -> Image.Image:
    """uint8 image rows (N, 3, H, W), each behind its label (drawn ``text_offset`` pixels above the row's middle)
    in a white margin ``label_width`` wide."""
    size, pad = rows[0].shape[-1], 2
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + columns * (size + pad) + pad, len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (images, text) in enumerate(zip(rows, labels)):
        y = pad + i * (size + pad)
        draw.text((4, y + size // 2 - text_offset), text, fill=(0, 0, 0))
        for j, image in enumerate(images):
            grid.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (label_width + pad + j * (size + pad), y))
    return grid
