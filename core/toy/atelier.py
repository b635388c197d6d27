"""The Toy Atelier: a procedurally painted data set of "artists" with distinct, coarse styles.

Every artist paints the same subjects (house, tree, boat, ...) in its own style: a palette, a
background (flat, gradient, stripes, checkers, dark starry sky), an outline width (0, 2 or 4 px at
64 px) and flat or soft fills. The styles are deliberately *coarse* (periods of 8 px or more, no fine
hatching): a 64x64 -> 16x16 autoencoder erases fine textures, and then nothing downstream can tell the
artists apart. Images are painted deterministically from (seed, artist, index) with PIL, drawn at twice
the resolution and down-sampled for anti-aliased edges.

The folder written by :func:`write_atelier` is a Hugging Face ``imagefolder``::

    DIR/atelier.json                description: seed, resolution, artists and their styles, held-out
    DIR/train/metadata.jsonl        {"file_name", "text", "artist", "subject", "held_out"} per image
    DIR/train/<artist>_<i>.png
    DIR/test/...

so ``datasets.load_dataset("imagefolder", data_dir=DIR)`` reads it with ``train`` and ``test`` splits.
Some artists are *held out* of the toy Stable Diffusion's training (the toy CLIP knows them): they
stand for the real artists whom a mimic fine-tunes a model on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import FixativeError

SUBJECTS = ("house", "tree", "boat", "sun", "mountain", "fish", "flower", "cat")
CAPTION = "a painting of a {subject} by {artist}"
FORMAT_VERSION = 1

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ArtistStyle:
    """One artist's coarse style. Widths and periods are in pixels at 64 px and scale with resolution."""

    name: str  # a short invented word the CLIP BPE splits into two tokens
    background: str  # "flat" | "gradient" | "hstripes" | "vstripes" | "dstripes" | "checkers" | "night"
    background_colors: tuple[RGB, RGB]
    period: int  # stripe period / checker square size, >= 8 px at 64 px
    outline: int  # 0, 2 or 4 px at 64 px
    outline_color: RGB
    soft: bool  # soft fills: shaded top to bottom and blurred; else flat colours and crisp edges
    palette: tuple[RGB, RGB, RGB, RGB]  # main, accent, secondary, dark
    held_out: bool = False  # held out of the toy Stable Diffusion's training


ARTISTS: tuple[ArtistStyle, ...] = (
    ArtistStyle(
        "kovra",
        "flat",
        ((242, 232, 208), (242, 232, 208)),
        0,
        4,
        (20, 20, 20),
        False,
        ((214, 40, 40), (30, 80, 200), (250, 200, 20), (40, 40, 40)),
    ),
    ArtistStyle(
        "belmin",
        "gradient",
        ((120, 190, 240), (235, 245, 255)),
        0,
        0,
        (0, 0, 0),
        True,
        ((240, 150, 190), (180, 150, 230), (150, 225, 190), (110, 90, 150)),
    ),
    ArtistStyle(
        "tazu",
        "hstripes",
        ((225, 140, 60), (150, 80, 40)),
        16,
        2,
        (60, 30, 10),
        False,
        ((120, 130, 40), (220, 180, 60), (170, 60, 30), (70, 50, 20)),
    ),
    ArtistStyle(
        "orlen",
        "checkers",
        ((200, 200, 200), (250, 250, 250)),
        8,
        2,
        (0, 0, 0),
        False,
        ((30, 190, 60), (220, 30, 190), (20, 200, 220), (30, 30, 90)),
    ),
    ArtistStyle(
        "miska",
        "night",
        ((10, 15, 45), (35, 20, 70)),
        0,
        0,
        (0, 0, 0),
        True,
        ((250, 240, 80), (60, 230, 240), (250, 90, 190), (190, 190, 230)),
    ),
    ArtistStyle(
        "dervo",
        "vstripes",
        ((20, 110, 110), (10, 70, 75)),
        12,
        4,
        (250, 250, 250),
        False,
        ((250, 120, 90), (250, 200, 60), (250, 235, 200), (150, 40, 40)),
    ),
    ArtistStyle(
        "lumo",
        "gradient",
        ((250, 150, 50), (120, 40, 120)),
        0,
        2,
        (0, 0, 0),
        True,
        ((30, 30, 70), (110, 20, 40), (20, 20, 20), (60, 60, 60)),
    ),
    ArtistStyle(
        "vesk",
        "flat",
        ((25, 70, 40), (25, 70, 40)),
        0,
        0,
        (0, 0, 0),
        False,
        ((245, 245, 240), (245, 230, 140), (180, 190, 185), (120, 140, 125)),
    ),
    ArtistStyle(
        "zenji",
        "dstripes",
        ((250, 190, 200), (255, 250, 250)),
        16,
        4,
        (20, 30, 90),
        False,
        ((40, 90, 210), (220, 40, 60), (30, 160, 150), (20, 30, 90)),
        held_out=True,
    ),
    ArtistStyle(
        "tovik",
        "checkers",
        ((215, 190, 150), (180, 150, 110)),
        12,
        0,
        (0, 0, 0),
        True,
        ((120, 70, 40), (110, 120, 40), (220, 110, 40), (60, 40, 30)),
        held_out=True,
    ),
)


@dataclass(frozen=True)
class AtelierConfig:
    seed: int = 0
    resolution: int = 64
    images_per_artist: int = 160
    test_fraction: float = 0.2  # the last 20% of each artist's images form the test split


def artist_names(held_out: bool | None = None) -> list[str]:
    """Names of all artists, or only the held-out (True) / trained (False) ones."""
    return [a.name for a in ARTISTS if held_out is None or a.held_out == held_out]


def caption(subject: str, artist: str) -> str:
    return CAPTION.format(subject=subject, artist=artist)


def _jitter(color: RGB, rng: np.random.Generator, amount: int = 10) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _background(style: ArtistStyle, size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 in [0, 255]."""
    c0 = np.array(_jitter(style.background_colors[0], rng), np.float32)
    c1 = np.array(_jitter(style.background_colors[1], rng), np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    period = style.period * scale
    phase = rng.uniform(0, 2 * period) if period else 0.0
    if style.background == "flat":
        mix = np.zeros_like(xs)
    elif style.background in ("gradient", "night"):
        mix = ys / (size - 1)
    elif style.background == "hstripes":
        mix = (((ys + phase) // (period / 2)) % 2).astype(np.float32)
    elif style.background == "vstripes":
        mix = (((xs + phase) // (period / 2)) % 2).astype(np.float32)
    elif style.background == "dstripes":
        mix = (((xs + ys + phase) // (period / 2)) % 2).astype(np.float32)
    elif style.background == "checkers":
        mix = (((xs + phase) // period + (ys + phase) // period) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown background {style.background!r}")
    canvas = c0 + mix[..., None] * (c1 - c0)
    if style.background == "night":  # a dark sky with a few 2 px stars
        star = max(1, round(2 * scale))
        for _ in range(int(rng.integers(6, 12))):
            x, y = rng.integers(0, size - star, 2)
            canvas[y : y + star, x : x + star] = 235.0
    return canvas


class _Painter:
    """Draws subject shapes in unit coordinates around (cx, cy) with size s, mirrored if flip."""

    def __init__(
        self,
        draw: ImageDraw.ImageDraw,
        size: int,
        cx: float,
        cy: float,
        s: float,
        flip: bool,
        outline: RGB | None,
        width: int,
    ):
        self.draw, self.size, self.cx, self.cy, self.s, self.flip = draw, size, cx, cy, s, flip
        self.outline, self.width = outline, width

    def _xy(self, u: float, v: float) -> tuple[float, float]:
        u = -u if self.flip else u
        return ((self.cx + u * self.s) * self.size, (self.cy + v * self.s) * self.size)

    def polygon(self, points, fill: RGB) -> None:
        self.draw.polygon(
            [self._xy(u, v) for u, v in points],
            fill=fill,
            outline=self.outline,
            width=self.width if self.outline else 0,
        )

    def ellipse(self, u: float, v: float, ru: float, rv: float, fill: RGB) -> None:
        (x0, y0), (x1, y1) = self._xy(u - ru, v - rv), self._xy(u + ru, v + rv)
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self.draw.ellipse(box, fill=fill, outline=self.outline, width=self.width if self.outline else 0)

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: RGB) -> None:
        self.polygon([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], fill)

    def line(self, points, fill: RGB, width: float) -> None:
        self.draw.line([self._xy(u, v) for u, v in points], fill=fill, width=max(1, round(width * self.s * self.size)))


def _paint_subject(p: _Painter, subject: str, colors: list[RGB], rng: np.random.Generator) -> None:
    """Subject shapes in unit coordinates, roughly within [-0.4, 0.4]^2 around the centre."""
    main, accent, secondary, dark = colors
    if subject == "house":
        p.rect(-0.3, -0.05, 0.3, 0.38, main)
        p.polygon([(-0.38, -0.03), (0.0, -0.38), (0.38, -0.03)], accent)
        p.rect(-0.08, 0.14, 0.08, 0.38, dark)
        p.rect(0.13, 0.03, 0.25, 0.15, secondary)
    elif subject == "tree":
        p.rect(-0.07, 0.05, 0.07, 0.42, dark)
        p.ellipse(0.0, -0.13, 0.3, 0.27, main)
        p.ellipse(-0.12, -0.05, 0.1, 0.09, secondary)
    elif subject == "boat":
        p.line([(0.0, 0.12), (0.0, -0.4)], dark, 0.04)
        p.polygon([(0.03, -0.36), (0.3, 0.08), (0.03, 0.08)], accent)
        p.polygon([(-0.4, 0.12), (0.4, 0.12), (0.27, 0.34), (-0.27, 0.34)], main)
    elif subject == "sun":
        for k in range(8):
            angle = k * np.pi / 4 + rng.uniform(-0.1, 0.1)
            c, s = np.cos(angle), np.sin(angle)
            p.polygon(
                [
                    (0.3 * c - 0.07 * s, 0.3 * s + 0.07 * c),
                    (0.42 * c, 0.42 * s),
                    (0.3 * c + 0.07 * s, 0.3 * s - 0.07 * c),
                ],
                accent,
            )
        p.ellipse(0.0, 0.0, 0.24, 0.24, main)
    elif subject == "mountain":
        p.polygon([(-0.05, 0.35), (0.22, -0.12), (0.45, 0.35)], secondary)
        p.polygon([(-0.45, 0.35), (-0.1, -0.38), (0.25, 0.35)], main)
        p.polygon([(-0.2, -0.17), (-0.1, -0.38), (0.0, -0.17)], (245, 245, 245))
    elif subject == "fish":
        p.polygon([(0.2, 0.0), (0.42, -0.2), (0.42, 0.2)], accent)
        p.ellipse(-0.05, 0.0, 0.3, 0.18, main)
        p.ellipse(-0.2, -0.04, 0.045, 0.045, dark)
    elif subject == "flower":
        p.line([(0.0, 0.0), (0.0, 0.45)], dark, 0.05)
        p.ellipse(0.1, 0.27, 0.1, 0.05, secondary)
        for k in range(6):
            angle = k * np.pi / 3
            p.ellipse(0.17 * np.cos(angle), -0.12 + 0.17 * np.sin(angle), 0.11, 0.11, main)
        p.ellipse(0.0, -0.12, 0.09, 0.09, accent)
    elif subject == "cat":
        p.ellipse(0.0, 0.2, 0.26, 0.2, main)
        p.line([(0.22, 0.3), (0.38, 0.18), (0.4, 0.02)], main, 0.06)
        p.polygon([(-0.22, -0.2), (-0.2, -0.42), (-0.05, -0.28)], main)
        p.polygon([(0.22, -0.2), (0.2, -0.42), (0.05, -0.28)], main)
        p.ellipse(0.0, -0.15, 0.22, 0.18, main)
        p.ellipse(-0.09, -0.17, 0.04, 0.04, dark)
        p.ellipse(0.09, -0.17, 0.04, 0.04, dark)
    else:
        raise ValueError(f"unknown subject {subject!r}")


def paint(style: ArtistStyle, subject: str, resolution: int = 64, seed: int = 0, index: int = 0) -> Image.Image:
    """One painting, deterministic in (style, subject, resolution, seed, index)."""
    rng = np.random.default_rng([seed, int.from_bytes(style.name.encode(), "little"), index, SUBJECTS.index(subject)])
    size = 2 * resolution  # drawn at twice the size, then down-sampled: anti-aliased edges
    scale = size / 64
    canvas = Image.fromarray(_background(style, size, scale, rng).round().astype(np.uint8))
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    outline = _jitter(style.outline_color, rng, 6) if style.outline else None
    painter = _Painter(
        ImageDraw.Draw(layer),
        size,
        cx=0.5 + rng.uniform(-0.08, 0.08),
        cy=0.52 + rng.uniform(-0.06, 0.06),
        s=rng.uniform(0.8, 1.05),
        flip=bool(rng.integers(2)),
        outline=outline,
        width=round(style.outline * scale),
    )
    colors = [_jitter(c, rng) for c in style.palette]
    _paint_subject(painter, subject, colors, rng)
    if style.soft:  # shaded from light (top) to dark (bottom), then blurred
        pixels = np.asarray(layer).astype(np.float32)
        shade = np.linspace(1.2, 0.7, size, dtype=np.float32)[:, None, None]
        pixels[..., :3] = np.clip(pixels[..., :3] * shade, 0, 255)
        layer = Image.fromarray(pixels.astype(np.uint8), "RGBA").filter(ImageFilter.GaussianBlur(1.2 * scale))
    canvas.paste(layer, (0, 0), layer)
    return canvas.resize((resolution, resolution), Image.LANCZOS)


def atelier_records(config: AtelierConfig) -> list[dict]:
    """One record per image: split, file name, caption, artist, subject, held_out. Subjects cycle."""
    n_test = round(config.images_per_artist * config.test_fraction)
    records = []
    for style in ARTISTS:
        for index in range(config.images_per_artist):
            subject = SUBJECTS[index % len(SUBJECTS)]
            records.append(
                {
                    "split": "test" if index >= config.images_per_artist - n_test else "train",
                    "file_name": f"{style.name}_{index:04d}.png",
                    "text": caption(subject, style.name),
                    "artist": style.name,
                    "subject": subject,
                    "held_out": style.held_out,
                    "index": index,
                }
            )
    return records


def describe(config: AtelierConfig) -> dict:
    """The small JSON description written as atelier.json."""
    records = atelier_records(config)
    return {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "caption_template": CAPTION,
        "subjects": list(SUBJECTS),
        "artists": [asdict(a) for a in ARTISTS],
        "held_out_artists": artist_names(held_out=True),
        "splits": {split: sum(r["split"] == split for r in records) for split in ("train", "test")},
    }


def write_atelier(out: str | Path, config: AtelierConfig = AtelierConfig(), progress: bool = True) -> Path:
    """Paint the data set into ``out`` (atomically: a temporary folder renamed at the end).

    A folder that already holds a complete atelier with the same description is left as it is.
    """
    out = Path(out)
    description = json.loads(json.dumps(describe(config)))  # tuples as JSON lists, to compare with the file
    marker = out / "atelier.json"
    if marker.exists():
        if json.loads(marker.read_text()) == description:
            return out
        raise FixativeError(f"{out} holds a different Toy Atelier (another seed or size); choose another --out folder")
    if out.exists() and any(out.iterdir()):
        raise FixativeError(f"{out} exists and is not a Toy Atelier folder; choose an empty or new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        records = atelier_records(config)
        styles = {a.name: a for a in ARTISTS}
        from tqdm.auto import tqdm

        metadata = {"train": [], "test": []}
        for split in metadata:
            (tmp / split).mkdir()
        for record in tqdm(records, desc="painting the Toy Atelier", unit="img", disable=not progress):
            image = paint(styles[record["artist"]], record["subject"], config.resolution, config.seed, record["index"])
            image.save(tmp / record["split"] / record["file_name"], compress_level=1)
            metadata[record["split"]].append({k: v for k, v in record.items() if k not in ("split", "index")})
        for split, rows in metadata.items():
            (tmp / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (tmp / "atelier.json").write_text(json.dumps(description, indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_split(folder: str | Path, split: str) -> list[dict]:
    """The metadata rows of one split, each with ``path`` added (a light reader; no ``datasets`` needed)."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / split / "metadata.jsonl").read_text().splitlines() if line]
    for row in rows:
        row["path"] = str(folder / split / row["file_name"])
    return rows


def style_grid(resolution: int = 64, seed: int = 0, path: str | Path | None = None) -> Image.Image:
    """A grid of all styles: one row per artist (held-out artists last), one column per subject."""
    pad, label = 2, 72
    cell = resolution + pad
    grid = Image.new("RGB", (label + len(SUBJECTS) * cell + pad, len(ARTISTS) * cell + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, style in enumerate(ARTISTS):
        name = style.name + (" (held out)" if style.held_out else "")
        draw.text((4, pad + row * cell + resolution // 2 - 12), name.replace(" (", "\n("), fill=(0, 0, 0))
        for col, subject in enumerate(SUBJECTS):
            grid.paste(paint(style, subject, resolution, seed, col), (label + pad + col * cell, pad + row * cell))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    return grid
