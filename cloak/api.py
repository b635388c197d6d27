"""``cloak(images, model, config) -> results`` and the batch over files behind ``fixative cloak``.

Each image is cloaked at its native size: padded (reflect) to the VAE's multiple and cropped back; an image larger
than ``tile_size`` is cut into overlapping tiles that are optimised as one batch and blended with linear ramps.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from fixative.core.errors import FixativeError
from fixative.core.layout import emulated_bf16_warning
from fixative.core.provenance import file_sha256, model_record

from . import files, targets
from .bounds import measure
from .budget import load_lpips
from .finalize import finalize, quantize
from .objectives import Surrogate
from .optimise import optimise
from .protect import CloakConfig, image_record, make_objective, uses_captions
from .robust import RandomTransform


@dataclass
class CloakResult:
    image: Image.Image | None  # the cloaked image, in the input's mode (None when it failed)
    record: dict  # method, budget values, latent distances, projection, seconds, provenance; or "error"


def _padded(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not pad_h and not pad_w:
        return pixels
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(pixels, (0, pad_w, 0, pad_h), mode=mode)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(tile: int, overlap: int, device) -> torch.Tensor:
    """Blend weights along one axis: rising over the overlap, flat inside, falling at the far edge."""
    weights = torch.ones(tile, device=device)
    if overlap:
        ramp = (torch.arange(overlap, device=device) + 1) / (overlap + 1)
        weights[:overlap] = ramp
        weights[-overlap:] = ramp.flip(0)
    return weights


def _tiles(pixels: torch.Tensor, multiple: int, tile_size: int):
    """(padded image, its overlapping tiles (T, 3, h, w), (row starts, column starts, h, w, overlap))."""
    padded = _padded(pixels, multiple)
    tile = max(multiple, tile_size - tile_size % multiple)
    overlap = (tile // 4) - (tile // 4) % multiple
    rows, columns = _tile_starts(padded.shape[-2], tile, overlap), _tile_starts(padded.shape[-1], tile, overlap)
    tile_h, tile_w = min(tile, padded.shape[-2]), min(tile, padded.shape[-1])
    crops = torch.cat([padded[..., y : y + tile_h, x : x + tile_w] for y in rows for x in columns])
    return padded, crops, (rows, columns, tile_h, tile_w, overlap)


def batch_surrogate(model, config: CloakConfig, artworks: list, tile_size: int) -> Surrogate | None:
    """Anti-DreamBooth's one surrogate for the whole batch (``ASPLConfig.batch``), warmed up on every readable
    artwork's tiles, grouped by size; None for other methods or per-image surrogates."""
    if config.method != "anti-dreambooth" or not config.aspl.batch:
        return None
    multiple = model.vae.config.downsampling_factor
    groups: dict[tuple, list[torch.Tensor]] = {}
    for artwork in artworks:
        if isinstance(artwork, files.Artwork):
            _, crops, _ = _tiles(artwork.pixels.to(model.vae.device), multiple, tile_size)
            groups.setdefault(tuple(crops.shape[-2:]), []).extend(crops)
    # tiles in the order of their content hashes: the surrogate is the same whatever order the files come in
    ordered = [
        torch.stack(sorted(group, key=lambda crop: hashlib.sha256(crop.cpu().numpy().tobytes()).hexdigest()))
        for _, group in sorted(groups.items())
    ]
    torch.manual_seed(config.seed)
    surrogate = Surrogate(model, config.aspl, config.seed)
    surrogate.warm_up(ordered)
    return surrogate


def image_delta(
    model,
    pixels: torch.Tensor,
    config: CloakConfig,
    style: str | None,
    lpips_metric,
    tied_channels: bool,
    tile_size: int,
    progress: bool,
    surrogate: Surrogate | None = None,
    caption: str | None = None,
) -> tuple[torch.Tensor, dict]:
    """δ for one image (1, 3, H, W) in [0, 1] at its native size, and what the record needs of the run."""
    multiple = model.vae.config.downsampling_factor
    height, width = pixels.shape[-2:]
    padded, crops, (rows, columns, tile_h, tile_w, overlap) = _tiles(pixels, multiple, tile_size)
    captions = [caption] * crops.shape[0] if caption is not None else None  # every tile shows the captioned image
    objective, aimed = make_objective(model, crops, config, style, surrogate, captions)
    transform = RandomTransform(config.robust, config.seed) if config.robust else None
    delta_tiles, run = optimise(
        crops, objective, config.budget, config.optimiser, lpips_metric, transform, tied_channels, progress
    )
    delta_tiles = delta_tiles.expand(-1, 3, -1, -1)
    delta = torch.zeros_like(padded)
    weight = torch.zeros_like(padded[:, :1])
    ramp = (
        _ramp(tile_h, overlap if len(rows) > 1 else 0, padded.device)[:, None]
        * _ramp(tile_w, overlap if len(columns) > 1 else 0, padded.device)[None, :]
    )
    index = 0
    for y in rows:
        for x in columns:
            delta[..., y : y + tile_h, x : x + tile_w] += ramp * delta_tiles[index]
            weight[..., y : y + tile_h, x : x + tile_w] += ramp
            index += 1
    delta = (delta / weight)[..., :height, :width]

    def target_distance(candidate: torch.Tensor) -> float | None:
        if objective.target_distance is None:
            return None
        padded_candidate = _padded(candidate, multiple)
        tiles = torch.cat([padded_candidate[..., y : y + tile_h, x : x + tile_w] for y in rows for x in columns])
        return float(objective.target_distance(tiles).mean())

    return delta, {
        "run": run,
        "aimed": aimed,
        "details": objective.details,
        "tiles": len(rows) * len(columns),
        "target_distance": target_distance,
    }


def cloak_artwork(
    model,
    artwork: files.Artwork,
    config: CloakConfig,
    style: str | None = None,
    lpips_metric=None,
    output_format: str = "png",
    tile_size: int = 1024,
    progress: bool = False,
    surrogate: Surrogate | None = None,
    caption: str | None = None,
) -> tuple[torch.Tensor, dict]:
    """Stored pixels (1, 3, H, W) of the cloaked artwork and its record (surrogate: ``batch_surrogate``'s;
    caption: the artwork's, for a semantic prompt that names ``{caption}``)."""
    started = time.time()
    torch.manual_seed(config.seed)
    pixels = artwork.pixels.to(model.vae.device)
    # an RGB PNG stores exactly the 8-bit rounding; every other output is encoded and read back
    exact = artwork.mode == "RGB" and output_format == "png"
    restore = quantize if exact else files.restorer(artwork, output_format)
    delta, info = image_delta(
        model, pixels, config, style, lpips_metric, artwork.grey, tile_size, progress, surrogate, caption
    )
    stored, scale, met = finalize(pixels, delta, config.budget, lpips_metric, restore)
    with torch.no_grad():
        values = measure(config.budget, stored, pixels, lpips_metric)
        before, after = info["target_distance"](pixels), info["target_distance"](stored)
    record = image_record(
        config,
        {**info["aimed"], **info["details"]},
        values,
        0,
        before,
        after,
        float(scale[0]),
        bool(met[0]),
        info["run"]["steps"],
        time.time() - started,
        lpips_metric,
    )
    record.update(tiles=info["tiles"], size=list(pixels.shape[-2:]), mode=artwork.mode, notes=artwork.notes)
    if uses_captions(config):
        record["caption"] = caption
    return stored, record


def lpips_for(config: CloakConfig, device) -> object | None:
    """The LPIPS metric. A budget that bounds LPIPS needs it: a missing backbone file is a FixativeError. Otherwise
    it is only measured into the records, when its pretrained backbone file is there (None when not)."""
    if config.budget.lpips is not None:
        return load_lpips(config.lpips_net, config.lpips_backbone, config.lpips_weights, device)
    if config.lpips_backbone != "pretrained":
        return None  # a random trunk measures nothing worth recording
    try:
        return load_lpips(config.lpips_net, "pretrained", config.lpips_weights, device)
    except FixativeError:
        return None


def resolve_style(
    model, config: CloakConfig, artworks: list[files.Artwork], clip_folder: str | Path | None
) -> tuple[str | None, dict]:
    """The target style: given, or ``auto`` (toy model: its artists judged by the toy CLIP)."""
    if config.method != "glaze" or config.target_style != "auto":
        return config.target_style, {}
    if clip_folder is None:
        if model.source != "toy":
            raise FixativeError("--target-style auto needs a CLIP model folder (--clip DIR) for a model other than toy")
        from fixative.core.toy import clip_folder as toy_clip

        clip_folder = toy_clip()
    if model.source == "toy":
        candidates, captions = targets.toy_candidates()
    else:
        candidates, captions = list(targets.ART_HISTORICAL_STYLES), None
    size = 64  # CLIP resizes again to its own input size; 64 keeps the stack small
    pixels = torch.cat([F.interpolate(a.pixels, size=(size, size), mode="bilinear", antialias=True) for a in artworks])
    style, distances = targets.auto_style(pixels, clip_folder, candidates, captions)
    return style, {"style_distances": distances}


def cloak(
    images,
    model,
    config: CloakConfig,
    style: str | None = None,
    output_format: str = "png",
    tile_size: int = 1024,
    progress: bool = False,
    captions: list[str | None] | None = None,
) -> list[CloakResult]:
    """Cloak PIL images (any mode) or image paths with ``model``; one CloakResult per image, in order.

    A file that cannot be read gives a result with ``image=None`` and the error in ``record["error"]``.
    captions: one per image, for a semantic prompt that names ``{caption}`` (default: for paths,
    ``files.read_caption``, read only when the prompt names it).
    """
    images = list(images)
    if captions is not None and len(captions) != len(images):
        raise FixativeError(f"cloak(): {len(captions)} captions for {len(images)} images")
    artworks, results = [], []
    for item in images:
        try:
            artworks.append(
                files.read_artwork(item) if isinstance(item, (str, Path)) else files.artwork_from_image(item)
            )
        except FixativeError as error:
            artworks.append(error)
    readable = [a for a in artworks if isinstance(a, files.Artwork)]
    if style is None and readable:
        style, _ = resolve_style(model, config, readable, None)
    lpips_metric = lpips_for(config, model.vae.device)
    surrogate = batch_surrogate(model, config, readable, tile_size)
    for index, (item, artwork) in enumerate(zip(images, artworks, strict=True)):
        try:
            if isinstance(artwork, FixativeError):
                raise artwork
            if captions is not None:
                caption = captions[index]
            else:  # read only when the prompt names it: no caption I/O (nor its errors) otherwise
                caption = files.read_caption(item) if uses_captions(config) and isinstance(item, (str, Path)) else None
            stored, record = cloak_artwork(
                model, artwork, config, style, lpips_metric, output_format, tile_size, progress, surrogate, caption
            )
        except FixativeError as error:
            results.append(CloakResult(None, {"error": str(error)}))
            continue
        results.append(CloakResult(files.to_image(artwork, stored), record))
    return results


def settings_hash(
    config: CloakConfig,
    model: dict,
    style: str | None,
    output_format: str,
    tile_size: int,
    batch_inputs: list[str] | None = None,
) -> str:
    """The resume key: settings, the model's source and weight-file hashes (``model_record``), style, format, and
    (batch_inputs) the hashes of every input when each output depends on the whole batch."""
    text = json.dumps(
        {
            "config": config.settings(),
            "batch_inputs": batch_inputs,
            "model": model,
            "style": style,
            "format": output_format,
            "tile_size": tile_size,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def launch_state(cpu: bool):
    """accelerate's state of a multi-process launch (``accelerate launch``, ``torchrun``: WORLD_SIZE > 1), or None
    for a lone process, which leaves accelerate's process-wide state untouched. accelerate joins CPU processes in one
    group only when told that the device is the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def cloak_files(
    inputs: list[str | Path],
    out: str | Path,
    model,
    config: CloakConfig,
    output_format: str = "png",
    tile_size: int = 1024,
    clip_folder: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Cloak every image file given or under the folders given into ``out`` (same relative paths), with a JSON
    record beside each output and ``summary.json``. Outputs whose record has the same settings hash are skipped;
    a file that fails is reported and the others finish. Returns the summary.

    Under a multi-process launch (``accelerate launch``, ``torchrun``) each process cloaks every n-th file on its own
    device and the main process writes the summary of all; an image's output does not depend on which process made
    it. What the whole batch decides (an ``auto`` target style, anti-dreambooth's warmed-up surrogate) every process
    computes alike."""
    from importlib.metadata import version

    state = launch_state(cpu=model.vae.device.type == "cpu")
    rank, processes = (state.process_index, state.num_processes) if state else (0, 1)
    main_process = rank == 0

    if output_format not in files.OUTPUT_FORMATS:
        raise FixativeError(f"--format must be one of {', '.join(files.OUTPUT_FORMATS)}, not {output_format!r}")
    if output_format == "jpeg":
        log(
            "warning: JPEG output re-compresses the cloak and weakens it; the budget is measured on the JPEG as "
            "stored. PNG (the default) keeps every pixel."
        )
    warning = emulated_bf16_warning(model.vae.device, "--autocast none (the default) cloaks in fp32")
    if config.optimiser.autocast == "bf16" and warning:
        log(f"warning: {warning}")
    out = Path(out)
    found = files.find_images(inputs)
    if not found:
        raise FixativeError(f"no image files in {', '.join(map(str, inputs))}")
    style, style_info, readable = config.target_style, {}, []
    whole_batch = config.method == "anti-dreambooth" and config.aspl.batch  # every image depends on all of them
    if (config.method == "glaze" and config.target_style == "auto") or whole_batch:
        for path, _ in found:
            try:
                readable.append(files.read_artwork(path))
            except FixativeError:
                pass
    if config.method == "glaze" and config.target_style == "auto":
        style, style_info = resolve_style(model, config, readable, clip_folder)
        if main_process:
            log(f"target style (auto): {style}")
    weights = model_record(model.source)  # weight-file hashes, cached by (path, size, mtime): cheap on a rerun
    batch_inputs = sorted(file_sha256(a.path) for a in readable) if whole_batch else None
    digest = settings_hash(config, weights, style, output_format, tile_size, batch_inputs)
    surrogate = None  # anti-dreambooth's batch-wide surrogate, warmed up when the first image needs it
    lpips_metric = lpips_for(config, model.vae.device)
    provenance = {
        "fixative": version("fixative"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(model.vae.device),
        "dtype": str(model.vae.dtype).removeprefix("torch."),
        "model": weights,
        "settings_hash": digest,
        "process": f"{rank} of {processes}",
    }
    rows, failures, skipped = [], [], 0

    def fail(index: int, path: Path, error: FixativeError) -> None:  # in the summary and one log line naming the file
        failures.append((index, {"input": str(path), "error": str(error)}))
        log(f"failed: {error}" if str(path) in str(error) else f"failed: {path}: {error}")

    mine = range(rank, len(found), processes)
    for index in tqdm(mine, desc="images", disable=not (progress and main_process)):
        path, relative = found[index]
        record_path = out / relative.with_suffix(".json")
        try:
            caption = files.read_caption(path) if uses_captions(config) else None
        except FixativeError as error:
            fail(index, path, error)
            continue
        if record_path.is_file():
            previous = json.loads(record_path.read_text())
            if (
                previous.get("provenance", {}).get("settings_hash") == digest
                and previous.get("caption") == caption
                and Path(previous["output"]).is_file()
            ):
                rows.append((index, previous))
                skipped += 1
                continue
        try:
            artwork = files.read_artwork(path)
            if whole_batch and surrogate is None:
                surrogate = batch_surrogate(model, config, readable, tile_size)
            stored, record = cloak_artwork(
                model, artwork, config, style, lpips_metric, output_format, tile_size, progress, surrogate, caption
            )
        except FixativeError as error:
            fail(index, path, error)
            continue
        output = out / relative.with_suffix(files.output_suffix(artwork, output_format))
        files.write_artwork(artwork, stored, output, output_format)
        record.update(
            input=str(path),
            input_sha256=file_sha256(path),
            output=str(output),
            target_style=style if config.method == "glaze" else None,
            settings=config.settings(),
            provenance=provenance,
            **style_info,
        )
        files.write_text(record_path, json.dumps(record, indent=1, default=str))
        rows.append((index, record))
    if processes > 1:
        from accelerate.utils import gather_object

        rows, failures, skipped = gather_object(rows), gather_object(failures), sum(gather_object([skipped]))
    # in the order the files were found, whichever process made them
    rows, failures = ([item for _, item in sorted(pairs, key=lambda pair: pair[0])] for pairs in (rows, failures))
    summary = {
        "settings_hash": digest,
        "method": config.method,
        "budget": config.budget.as_dict(),
        "target_style": style,
        "images": len(rows),
        "skipped_as_done": skipped,
        "failed": failures,
        "projected": sum(r["final_projection"] for r in rows),
        "provenance": provenance,
        "per_image": [
            {
                k: r.get(k)
                for k in (
                    "input",
                    "output",
                    "values",
                    "latent_distance_before",
                    "latent_distance_after",
                    "final_projection",
                    "seconds",
                )
            }
            for r in rows
        ],
    }
    if main_process:
        files.write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def summary_table(summary: dict) -> str:
    """The summary as a plain text table, one line per image."""
    lines = [
        f"{'image':<40} {'PSNR dB':>8} {'SSIM':>6} {'L-inf':>8} {'latent dist. before -> after':>30} {'projected':>9}"
    ]
    for row in summary["per_image"]:
        values = row["values"]
        before, after = row["latent_distance_before"], row["latent_distance_after"]
        distance = "—" if before is None else f"{before:.4f} -> {after:.4f}"
        lines.append(
            f"{Path(row['input']).name[:40]:<40} {values['psnr']:>8.2f} {values['ssim']:>6.3f} "
            f"{values['linf'] * 255:>6.1f}/255 {distance:>30} {'yes' if row['final_projection'] else 'no':>9}"
        )
    lines.append(
        f"{summary['images']} cloaked ({summary['skipped_as_done']} already done), "
        f"{len(summary['failed'])} failed, {summary['projected']} needed the final projection"
    )
    return "\n".join(lines)
