"""``fixative bench CONFIG.toml --out RUN``: a declarative experiment, cached stage by stage, with a report.

Every stage (generate images, extract features, cloak, attack, mimic, ...) is stored in ``RUN/stages/`` under the
SHA-256 of its name and inputs (settings, seeds, the keys of the stages it reads, hashes of weights), written
atomically when it finishes: a killed run started again redoes only the stage that was interrupted and gives the
same numbers. ``RUN/results.json`` holds the config, versions, device, seeds, input and weight hashes and every
figure; ``RUN/report.md`` and the self-contained ``RUN/report.html`` (plots and image grids inlined as PNG) show them.

Experiment kinds (``[experiment] kind``):
    guidance     FID (to real paintings) and CLIP score of the model's generations over guidance scales: the
                 diversity-fidelity trade-off of classifier-free guidance
    protection   mimicry of each artist from clean images and from cloaked images (cloak methods x budgets), with
                 and without adversaries: protection rate with its 95% interval, where the generations went, and
                 FID / CLIP score of the mimic's generations
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fixative.core.errors import FixativeError

from .grid import labelled_grid

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

KINDS = ("guidance", "protection")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Stages:
    """Stage results cached in ``folder`` by the hash of (name, inputs)."""

    folder: Path
    log: Callable[[str], None] = print
    done: dict = field(default_factory=dict)  # name -> "cached" | seconds

    def run(self, name: str, inputs: dict, compute: Callable[[], dict]) -> tuple[dict, str]:
        """(result, key); ``compute`` returns a dict of tensors, numbers, strings and lists."""
        key = _digest({"stage": name, **inputs})[:20]
        path = self.folder / f"{name}-{key}.pt"
        if path.is_file():
            self.done[name] = "cached"
            return torch.load(path, weights_only=False), key
        started = time.time()
        self.log(f"stage {name} ...")
        result = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        os.close(handle)
        try:
            torch.save(result, temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.done[name] = round(time.time() - started, 1)
        self.log(f"stage {name}: {self.done[name]} s")
        return result, key


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FixativeError(f"benchmark config {path} not found")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise FixativeError(f"{path} is not valid TOML: {error}") from None
    kind = config.get("experiment", {}).get("kind")
    if kind not in KINDS:
        raise FixativeError(f"{path}: [experiment] kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return config


def _uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> uint8 images."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _versions(device) -> dict:
    import transformers

    from fixative import __version__

    return {
        "fixative": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _grid_png(rows: list[torch.Tensor], labels: list[str]) -> str:
    """uint8 image rows (N, 3, H, W) -> a labelled grid as base64 PNG."""
    grid = labelled_grid(rows, labels, label_width=150, text_offset=6)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def _markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html(title: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained page: tables as HTML, images inlined as data URIs."""
    import html

    body = []
    for heading, content in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if content.startswith("png:"):
            body.append(f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{content[4:]}">')
        else:  # a markdown table
            lines = [line for line in content.splitlines() if not line.startswith("|---")]
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
            rows = "".join(
                "<tr>"
                + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row)
                + "</tr>"
                for i, row in enumerate(cells)
            )
            body.append(f"<table>{rows}</table>")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>"
    )


# ---------------------------------------------------------------- the toy world's data


def _toy_rows(split: str) -> list[dict]:
    from fixative.core.toy import atelier, toy_folder

    from .toy_report import atelier_for

    return atelier.load_split(atelier_for(toy_folder()), split)


def _generate(model, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 64):
    from .mimicry import MimicConfig, sample

    config = MimicConfig(num_inference_steps=steps, guidance_scale=guidance, sample_batch=batch)
    return _uint8(sample(model, prompts, seeds, config))


# ---------------------------------------------------------------- guidance


def run_guidance(config: dict, stages: Stages, device) -> tuple[dict, list[tuple[str, str]], str]:
    """FID and CLIP score over guidance scales; returns (figures, report sections, markdown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fixative.core.checkpoints import load_model
    from fixative.core.toy import atelier, model_folder

    from .clip_score import CLIPScorer
    from .features import folder_sha256, make_extractor
    from .fid import fid

    settings = config["guidance"]
    seed = config["experiment"].get("seed", 0)
    scales = [float(s) for s in settings["scales"]]
    per_prompt = int(settings.get("samples_per_prompt", 2))
    steps = int(settings.get("steps", 25))
    artists = settings.get("artists") or atelier.artist_names(held_out=False)
    subjects = settings.get("subjects") or list(atelier.SUBJECTS)
    features_spec = settings.get("features", "clip:toy")
    model_hash = folder_sha256(model_folder())
    extractor = make_extractor(features_spec, settings.get("inception_weights"), device)
    scorer = CLIPScorer(settings.get("clip_folder") or str(model_folder().parent / "clip"), device)

    def real_features():
        from .toy_report import pixels_of

        rows = [r for r in _toy_rows("test") if r["artist"] in artists]
        return {"features": extractor(_uint8(pixels_of(rows))), "images": len(rows)}

    real, real_key = stages.run("real-features", {"extractor": extractor.provenance, "artists": artists}, real_features)
    model = None
    prompts = [atelier.caption(s, a) for a in artists for s in subjects for _ in range(per_prompt)]
    seeds = [seed * 100_000 + i for i in range(len(prompts))]
    rows, grid_rows = [], []
    for scale in scales:

        def generate_at(scale=scale):
            nonlocal model
            model = model or load_model("toy", device=device)
            return {"images": _generate(model, prompts, seeds, steps, scale)}

        inputs = {"model": model_hash, "prompts": prompts, "seeds": seeds, "steps": steps, "guidance": scale}
        images, images_key = stages.run(f"generate-g{scale:g}", inputs, generate_at)

        def measure(images=images):
            fake = extractor(images["images"])
            return {"fid": fid(real["features"], fake), "clip_score": scorer(list(images["images"]), prompts).value}

        figures, _ = stages.run(
            f"metrics-g{scale:g}",
            {"images": images_key, "real": real_key, "extractor": extractor.provenance, "clip": scorer.provenance},
            measure,
        )
        rows.append(
            {"guidance": scale, "fid": figures["fid"], "clip_score": figures["clip_score"], "images": len(prompts)}
        )
        grid_rows.append(images["images"][:: per_prompt * len(subjects)][:8])

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["guidance"] for r in rows], [r["fid"] for r in rows], "o-")
    left.set(xlabel="guidance scale", ylabel=f"FID ({features_spec} features)", title="FID against guidance")
    right.plot([r["clip_score"] for r in rows], [r["fid"] for r in rows], "o-")
    for r in rows:
        right.annotate(f"{r['guidance']:g}", (r["clip_score"], r["fid"]), textcoords="offset points", xytext=(4, 4))
    right.set(xlabel="CLIP score", ylabel="FID", title="FID against CLIP score over guidance scales")
    plot = _png(figure)
    plt.close(figure)
    cells = [[f"{r['guidance']:g}", f"{r['fid']:.3f}", f"{r['clip_score']:.2f}", r["images"]] for r in rows]
    table = _markdown_table(["guidance", "FID", "CLIP score", "images"], cells)
    sections = [
        ("FID and CLIP score over guidance scales", table),
        ("plots", "png:" + plot),
        (
            "one generation per artist at each scale (rows: scales)",
            "png:" + _grid_png(grid_rows, [f"guidance {s:g}" for s in scales]),
        ),
    ]
    figures = {
        "rows": rows,
        "features": extractor.provenance,
        "clip": scorer.provenance,
        "real_images": real["images"],
        "model_sha256": model_hash,
    }
    return figures, sections, table


# ---------------------------------------------------------------- protection


def _cloak_config(spec: str, seed: int):
    """``METHOD:budget;budget...[:steps=N]``, e.g. ``glaze:psnr=32`` or ``glaze:psnr=28:steps=50``."""
    from fixative.cloak import Budget, CloakConfig, OptimiserConfig, parse_budget

    method, _, rest = spec.partition(":")
    budgets, steps = [], 100
    for part in filter(None, rest.split(":")):
        if part.startswith("steps="):
            steps = int(part.split("=")[1])
        else:
            budgets.append(part)
    return CloakConfig(
        method=method,
        budget=parse_budget(budgets) if budgets else Budget(psnr=32),
        optimiser=OptimiserConfig(steps=steps),
        seed=seed,
    )


def run_protection(config: dict, stages: Stages, device) -> tuple[dict, list[tuple[str, str]], str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fixative.core.checkpoints import load_model
    from fixative.core.datasets import ImageCaptions
    from fixative.core.toy import atelier, clip_folder, model_folder

    from .adversaries import parse_adversary
    from .attribution import ToyJudge
    from .clip_score import CLIPScorer
    from .features import CLIPFeatures, folder_sha256
    from .fid import fid
    from .mimicry import MimicConfig, fine_tune_mimic, protection, sample, similarity_to
    from .toy_report import MIMIC_NAMES, pixels_of

    settings = config["protection"]
    seed = config["experiment"].get("seed", 0)
    artists = settings.get("artists", ["zenji", "tovik"])
    targets = settings.get("targets", {"zenji": "lumo", "tovik": "dervo"})
    cells = settings.get("cells", ["clean"])
    attacks = settings.get("adversaries", ["none"])
    images_per_artist = int(settings.get("images", 24))
    mimic = MimicConfig(**settings.get("mimic", {}), seed=seed)
    model_hash = folder_sha256(model_folder())
    judge = ToyJudge(clip_folder(), device)
    scorer = CLIPScorer(clip_folder(), device)
    features = CLIPFeatures(clip_folder(), device)
    model = load_model("toy", device=device)
    train_rows, test_rows = _toy_rows("train"), _toy_rows("test")
    per_artist = settings.get("prior_per_artist")  # prior images per trained artist (default: all)
    prior_rows = [r for r in train_rows if not r["held_out"]]
    if per_artist is not None:
        by_artist: dict[str, list] = {}
        for row in prior_rows:
            by_artist.setdefault(row["artist"], []).append(row)
        prior_rows = [row for rows in by_artist.values() for row in rows[:per_artist]]
    prior = ImageCaptions(pixels_of(prior_rows), [r["text"] for r in prior_rows])
    results, table_rows, grids = [], [], []
    for artist in artists:
        name = MIMIC_NAMES.get(artist, f"{artist}x")
        rows = [r for r in train_rows if r["artist"] == artist][:images_per_artist]
        clean = pixels_of(rows)
        captions = [atelier.caption(r["subject"], name) for r in rows]
        held_out = pixels_of([r for r in test_rows if r["artist"] == artist])
        held_features = features(_uint8(held_out))
        prompts = [atelier.caption(s, name) for s in atelier.SUBJECTS]
        all_prompts = [p for p in prompts for _ in range(mimic.samples_per_prompt)]
        for cell in cells:

            def cloak_stage(cell=cell, clean=clean, artist=artist):
                if cell == "clean":
                    return {"pixels": clean, "values": {}}
                from fixative.cloak.protect import cloak_pixels

                cloak_config = _cloak_config(cell, seed)
                stored, records = cloak_pixels(model, (clean + 1) / 2, cloak_config, style=targets.get(artist))
                values = {k: sum(r["values"][k] for r in records) / len(records) for k in ("psnr", "ssim", "linf")}
                return {"pixels": stored * 2 - 1, "values": values}

            cloaked, cloak_key = stages.run(
                f"cloak-{artist}-{cell}",
                {"model": model_hash, "artist": artist, "cell": cell, "images": images_per_artist, "seed": seed},
                cloak_stage,
            )
            for attack in attacks:

                def mimic_stage(
                    cloaked=cloaked,
                    attack=attack,
                    artist=artist,
                    captions=captions,
                    all_prompts=all_prompts,
                    held_out=held_out,
                    held_features=held_features,
                ):
                    adversaries = [] if attack == "none" else [parse_adversary(a) for a in attack.split("+")]
                    pixels = cloaked["pixels"]
                    for index, adversary in enumerate(adversaries):
                        pixels = adversary((pixels + 1) / 2, seed=seed + index, model=model) * 2 - 1
                    mimic_model, seconds = fine_tune_mimic(model, pixels, captions, mimic, prior, log=lambda _: None)
                    seeds = [seed * 100_000 + 50_000 + i for i in range(len(all_prompts))]
                    generations = sample(mimic_model, all_prompts, seeds, mimic)
                    predicted, _ = judge.classify(generations)
                    images = _uint8(generations)
                    return {
                        **protection(predicted, artist, list(judge.artists)),
                        "seconds": seconds,
                        "similarity_to_held_out": similarity_to(judge, generations, held_out),
                        "fid_to_held_out": fid(held_features, features(images)),
                        "clip_score": scorer(list(images), all_prompts).value,
                        "images": images[:8],
                        "trained_on": _uint8(pixels[:8]),
                    }

                outcome, _ = stages.run(
                    f"mimic-{artist}-{cell}-{attack}",
                    {
                        "cloak": cloak_key,
                        "attack": attack,
                        "mimic": vars(mimic),
                        "prompts": all_prompts,
                        "prior": len(prior_rows),
                        "judge": folder_sha256(clip_folder()),
                    },
                    mimic_stage,
                )
                low, high = outcome["protection_interval"]
                record = {
                    "artist": artist,
                    "cell": cell,
                    "adversary": attack,
                    **cloaked["values"],
                    **{k: v for k, v in outcome.items() if k not in ("images", "trained_on")},
                }
                results.append(record)
                went = ", ".join(f"{a} {n}" for a, n in outcome["attributed_to"].items() if n)
                table_rows.append(
                    [
                        artist,
                        cell,
                        attack,
                        f"{cloaked['values'].get('psnr', float('nan')):.1f}",
                        f"{100 * outcome['protection_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]",
                        went,
                        f"{outcome['fid_to_held_out']:.2f}",
                        f"{outcome['clip_score']:.2f}",
                    ]
                )
                if attack == attacks[0]:
                    difference = ((cloaked["pixels"][:8] - clean[:8]) * 10).clamp(-1, 1)
                    grids.append(
                        (
                            f"{artist} {cell}",
                            [_uint8(clean[:8]), _uint8(cloaked["pixels"][:8]), _uint8(difference), outcome["images"]],
                        )
                    )
    table = _markdown_table(
        [
            "artist",
            "cloak",
            "adversary",
            "PSNR dB",
            "protection [95% CI]",
            "generations went to",
            "FID to held-out",
            "CLIP score",
        ],
        table_rows,
    )
    figure, axis = plt.subplots(figsize=(6, 4))
    for artist in artists:
        for attack in attacks:
            points = [r for r in results if r["artist"] == artist and r["adversary"] == attack and "psnr" in r]
            if not points:
                continue
            points.sort(key=lambda r: -r["psnr"])
            values = [100 * r["protection_rate"] for r in points]
            errors = [
                [100 * (r["protection_rate"] - r["protection_interval"][0]) for r in points],
                [100 * (r["protection_interval"][1] - r["protection_rate"]) for r in points],
            ]
            axis.errorbar(
                [r["psnr"] for r in points], values, yerr=errors, marker="o", capsize=3, label=f"{artist}, {attack}"
            )
    axis.set(
        xlabel="cloak budget (PSNR dB, lower = more visible)",
        ylabel="protection rate (%)",
        title="protection against budget (95% Wilson intervals)",
    )
    axis.invert_xaxis()
    if axis.lines:
        axis.legend(fontsize=7)
    sections = [("protection", table), ("protection against budget", "png:" + _png(figure))]
    plt.close(figure)
    for label, rows in grids:
        sections.append(
            (
                f"{label}: original / cloaked / difference x10 / mimicked",
                "png:" + _grid_png(rows, ["original", "cloaked", "difference x10", "mimicked"]),
            )
        )
    return {"rows": results, "model_sha256": model_hash}, sections, table


def bench(config_path: str | Path, out: str | Path, device="cpu", log=print, seed: int | None = None) -> dict:
    """Run the experiment of ``config_path`` into ``out``; returns results.json's content. ``seed`` replaces the
    config's ``[experiment] seed`` when given."""
    from .features import file_sha256

    config = load_config(config_path)
    if seed is not None:
        config["experiment"]["seed"] = seed
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out / "stages", log)
    seed = config["experiment"].get("seed", 0)
    torch.manual_seed(seed)
    started = time.time()
    runner = {"guidance": run_guidance, "protection": run_protection}[config["experiment"]["kind"]]
    figures, sections, table = runner(config, stages, device)
    results = {
        "config": config,
        "config_sha256": file_sha256(config_path),
        "versions": _versions(device),
        "seed": seed,
        "figures": figures,
        "stages": stages.done,
        "seconds": round(time.time() - started, 1),
    }
    _write(out / "results.json", json.dumps(results, indent=1, default=str))
    title = config["experiment"].get("name", Path(config_path).stem)
    _write(out / "report.md", f"# {title}\n\n{table}\n\nConfig: `{config_path}`; details in results.json.\n")
    _write(out / "report.html", _html(title, sections))
    return results


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _row_key(row: dict) -> str:
    if "guidance" in row:
        return f"guidance {row['guidance']:g}"
    return f"{row['artist']} / {row['cell']} / {row['adversary']}"


def compare(run_a: str | Path, run_b: str | Path) -> str:
    """What changed between two runs: config and versions, then every figure side by side with its change."""
    results = []
    for run in (run_a, run_b):
        path = Path(run) / "results.json"
        if not path.is_file():
            raise FixativeError(f"{run} has no results.json; give two finished `fixative bench` run folders")
        results.append(json.loads(path.read_text()))
    a, b = results
    lines = [f"A: {run_a}", f"B: {run_b}"]
    settings_a = _flatten({"config": a["config"], "versions": a["versions"]})
    settings_b = _flatten({"config": b["config"], "versions": b["versions"]})
    changed = [k for k in sorted(set(settings_a) | set(settings_b)) if settings_a.get(k) != settings_b.get(k)]
    lines.append("settings changed:" if changed else "settings: the same")
    lines += [f"  {k}: {settings_a.get(k)!r} -> {settings_b.get(k)!r}" for k in changed]
    rows_a = {_row_key(r): r for r in a["figures"]["rows"]}
    rows_b = {_row_key(r): r for r in b["figures"]["rows"]}
    metrics = ("fid", "clip_score", "protection_rate", "fid_to_held_out", "similarity_to_held_out", "psnr")
    for key in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        left, right = rows_a.get(key, {}), rows_b.get(key, {})
        parts = []
        for metric in metrics:
            if metric in left or metric in right:
                x, y = left.get(metric), right.get(metric)
                delta = f" ({y - x:+.3g})" if isinstance(x, (int, float)) and isinstance(y, (int, float)) else ""
                parts.append(f"{metric} {x if x is None else f'{x:.4g}'} -> {y if y is None else f'{y:.4g}'}{delta}")
        lines.append(f"{key}: " + "; ".join(parts))
    return "\n".join(lines)
