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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _kind(name: str) -> str:
    """A stage's kind: its name up to the first '-' (cloak, mimic, generate, ...)."""
    return name.partition("-")[0]


@dataclass
class Stages:
    """Stage results cached in ``folder`` by the hash of (name, inputs). With the stages to come announced
    (``expect``), each finished stage logs its place, the time so far and an ETA: the mean seconds of the stages
    of each kind computed so far (or of all computed stages, for a kind not yet computed) times those still to
    come; cached stages take no time."""

    folder: Path
    log: Callable[[str], None] = print
    done: dict = field(default_factory=dict)  # name -> "cached" | seconds
    clock: Callable[[], float] = time.time
    planned: dict = field(default_factory=dict)  # kind -> stages of that kind still to come
    total: int = 0
    calls: int = 0
    started: float | None = None
    computed: dict = field(default_factory=dict)  # kind -> seconds of each computed stage

    def expect(self, names: list[str]) -> None:
        """Announce the stages this run will ask for (names, or just their kinds)."""
        for name in names:
            self.planned[_kind(name)] = self.planned.get(_kind(name), 0) + 1
        self.total += len(names)
        if self.started is None:
            self.started = self.clock()

    def unexpect(self, name: str) -> None:
        """One announced stage of ``name``'s kind will not be asked for after all."""
        if self.planned.get(_kind(name)):
            self.planned[_kind(name)] -= 1
            self.total -= 1

    def eta(self) -> float | None:
        """Seconds still to go, from the stages computed so far; None before any was computed."""
        every = [s for seconds in self.computed.values() for s in seconds]
        if not every:
            return None
        mean = sum(every) / len(every)
        return sum(
            left * (sum(self.computed[kind]) / len(self.computed[kind]) if self.computed.get(kind) else mean)
            for kind, left in self.planned.items()
        )

    def _finished(self, name: str, seconds: float | None, kind: str | None) -> None:
        kind = kind or _kind(name)
        self.calls += 1
        if self.planned.get(kind):
            self.planned[kind] -= 1
        if seconds is not None:
            self.computed.setdefault(kind, []).append(seconds)
        if not self.total:
            if seconds is not None:
                self.log(f"stage {name}: {self.done[name]} s")
            return
        place = f"[{self.calls}/{max(self.total, self.calls)}]"
        took = "cached" if seconds is None else _duration(seconds)
        eta = self.eta()
        remaining = "ETA unknown" if eta is None else f"ETA {_duration(eta)}"
        self.log(f"{place} stage {name}: {took} (elapsed {_duration(self.clock() - self.started)}, {remaining})")

    def run(self, name: str, inputs: dict, compute: Callable[[], dict], kind: str | None = None) -> tuple[dict, str]:
        """(result, key); ``compute`` returns a dict of tensors, numbers, strings and lists. ``kind``: the stage's kind
        for the ETA when it is not the name's first word."""
        key = _digest({"stage": name, **inputs})[:20]
        path = self.folder / f"{name.replace('/', '_')}-{key}.pt"
        if self.started is None:
            self.started = self.clock()
        if path.is_file():
            self.done[name] = "cached"
            self._finished(name, None, kind)
            return torch.load(path, weights_only=False), key
        started = self.clock()
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
        seconds = self.clock() - started
        self.done[name] = round(seconds, 1)
        self._finished(name, seconds, kind)
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


def _grids(settings: dict) -> list[tuple[list[str], list[str]]]:
    """The (cells, adversaries) grids: ``[[protection.grid]]`` tables in order, or ``cells`` x ``adversaries``."""
    if settings.get("grid"):
        if "cells" in settings:
            raise FixativeError("[protection]: give either cells and adversaries or [[protection.grid]] tables")
        grids = [(list(g.get("cells", [])), list(g.get("adversaries", ["none"]))) for g in settings["grid"]]
    else:
        grids = [(list(settings.get("cells", ["clean"])), list(settings.get("adversaries", ["none"])))]
    if not all(cells and adversaries for cells, adversaries in grids):
        raise FixativeError("[protection]: every grid needs at least one cell and one adversary")
    return grids


def _sampler_label(sampling: dict) -> str:
    return f"{sampling['scheduler']}-{sampling['num_inference_steps']}"


def _check_label(check: dict | None) -> str:
    """A cell's sampler check: the reference sampler's protection on the paired generations, and the share of
    pairs attributed alike; "DISAGREES" when the sampler's share lies outside the reference's interval."""
    if not check:
        return "-"
    low, high = check["reference_protection_interval"]
    return (
        f"{_sampler_label(check['reference'])} {100 * check['reference_protection_rate']:.1f}% "
        f"[{100 * low:.1f}, {100 * high:.1f}], {100 * check['paired_agreement']:.0f}% of {check['generations']}"
        + ("" if check["agrees"] else ", DISAGREES")
    )


def run_protection(config: dict, stages: Stages, device) -> tuple[dict, list[tuple[str, str]], str]:
    """Mimicry of each artist from clean and cloaked images under adversaries. With ``[protection.mimic] sampler
    = "lcm"``, each artist's clean control is first also sampled with DDIM: where the two attributions disagree
    (``mimicry.samplers_agree``), that artist's cells sample with DDIM instead."""
    import dataclasses

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
    from .mimicry import MimicConfig, apply_adversaries, mimicry, shares_agree
    from .protection import (
        best_method,
        check_defaults,
        cloak_cell,
        cloak_code_sha256,
        method_of,
        parse_cell,
        resolve,
    )
    from .toy_report import MIMIC_NAMES, pixels_of

    settings = config["protection"]
    seed = config["experiment"].get("seed", 0)
    artists = settings.get("artists", ["zenji", "tovik"])
    targets = settings.get("targets", {"zenji": "lumo", "tovik": "dervo"})
    grids = _grids(settings)
    for cells, attacks in grids:  # every spec is checked before anything runs
        for spec in cells:
            parse_cell(spec)
        for attack in attacks:
            if attack != "none":
                [parse_adversary(a) for a in attack.split("+")]
    cloak_defaults = check_defaults(settings.get("cloak", {}))
    images_per_artist = int(settings.get("images", 24))
    known = {f.name for f in dataclasses.fields(MimicConfig)} - {"seed"}
    unknown = sorted(set(settings.get("mimic", {})) - known)
    if unknown:
        raise FixativeError(f"[protection.mimic]: unknown setting(s) {', '.join(unknown)}; use {', '.join(known)}")
    mimic = MimicConfig(**settings.get("mimic", {}), seed=seed)
    differs = mimic.sampling() != mimic.sampling("reference")  # e.g. LCM, or DDIM with fewer steps
    check_sampler = "reference" if differs and settings.get("check_sampler", True) else None
    lcm_control = check_sampler if mimic.sampler == "lcm" else None  # LCM: its clean controls are checked first
    model_hash = folder_sha256(model_folder())
    judge_hash = folder_sha256(clip_folder())
    cloak_code = cloak_code_sha256()
    lcm_hash = None
    if mimic.sampler == "lcm":
        from fixative.consistency.toy import toy_lcm_lora

        lcm_hash = folder_sha256(toy_lcm_lora().parent)
    cloak_specs = {parse_cell(spec).cloak_spec for cells, _ in grids for spec in cells}
    mimics = sum(len(cells) * len(attacks) for cells, attacks in grids)
    stages.expect((["cloak"] * len(cloak_specs) + ["mimic"] * mimics + ["check"] * bool(lcm_control)) * len(artists))
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
    data = {}
    for artist in artists:
        name = MIMIC_NAMES.get(artist, f"{artist}x")
        rows = [r for r in train_rows if r["artist"] == artist][:images_per_artist]
        held_out = pixels_of([r for r in test_rows if r["artist"] == artist])
        data[artist] = {
            "clean": pixels_of(rows),
            "captions": [atelier.caption(r["subject"], name) for r in rows],
            # what a cloak's semantic prompt names: the toy caption up to its artist, "a painting of a cat"
            "content": [atelier.CAPTION.partition(" by ")[0].format(subject=r["subject"]) for r in rows],
            "held_out": held_out,
            "held_features": features(_uint8(held_out)),
            "prompts": [atelier.caption(s, name) for s in atelier.SUBJECTS],
        }

    cloaks: dict[tuple[str, str], tuple[dict, str]] = {}  # (artist, cloak spec) -> the stage's (result, key)

    def cloak_stage(artist: str, spec: str) -> tuple[dict, str]:
        cell = parse_cell(spec)
        if (artist, cell.cloak_spec) in cloaks:
            return cloaks[artist, cell.cloak_spec]
        inputs = {"model": model_hash, "artist": artist, "images": images_per_artist, "seed": seed}
        if cell.method != "clean":
            from .protection import cloak_config

            inputs.update(
                settings=cloak_config(cell, seed, cloak_defaults).settings(),
                style=cell.options.get("target", targets.get(artist)),
                code=cloak_code,
            )
        cloaks[artist, cell.cloak_spec] = stages.run(
            f"cloak-{artist}-{cell.cloak_spec}",
            inputs,
            lambda: cloak_cell(
                model, data[artist]["clean"], cell, seed, targets.get(artist), cloak_defaults, data[artist]["content"]
            ),
        )
        return cloaks[artist, cell.cloak_spec]

    def mimic_stage(
        artist: str, spec: str, adversary: str, mimic_config: MimicConfig, check: str | None, kind: str | None = None
    ):
        cell = parse_cell(spec)
        cloaked, cloak_key = cloak_stage(artist, spec)
        attack = cell.attack(adversary)
        own = data[artist]

        def compute():
            adversaries = [] if attack == "none" else [parse_adversary(a) for a in attack.split("+")]
            trained_on = apply_adversaries(cloaked["pixels"], adversaries, model, seed)
            results, generations = mimicry(
                model,
                trained_on,
                own["captions"],
                artist,
                own["prompts"],
                judge,
                mimic_config,
                prior,
                own["held_out"],
                check_sampler=check,
                log=lambda _: None,
            )
            images = _uint8(generations)
            first = results["first_round"]  # FID on the same number of generations in every cell
            dropped = ("prompts", "config", "adversaries", "generation_prompts")
            return {
                **{k: v for k, v in results.items() if k not in dropped},
                "seconds": results["fine_tune_seconds"],
                "fid_to_held_out": fid(own["held_features"], features(images[:first])),
                "fid_generations": first,
                "clip_score": scorer(list(images), results["generation_prompts"]).value,
                "images": images[:8],
                "trained_on": _uint8(trained_on[:8]),
            }

        inputs = {
            "cloak": cloak_key,
            "attack": attack,
            "mimic": dataclasses.asdict(mimic_config),
            "prompts": own["prompts"],
            "prior": len(prior_rows),
            "judge": judge_hash,
            "lcm_lora": lcm_hash if "lcm" in (mimic_config.sampler, check) else None,
            "check": check,
        }
        outcome, _ = stages.run(f"mimic-{artist}-{spec}-{adversary}", inputs, compute, kind)
        return cloaked, outcome

    sampler_of, checks = {}, []
    for artist in artists:
        sampler_of[artist] = mimic
        if lcm_control:
            _, outcome = mimic_stage(artist, "clean", "none", mimic, lcm_control, kind="check")
            check = dict(outcome["sampler_check"])  # decided here from the cached counts, not frozen in the cache
            check["agrees"] = shares_agree(check["distilled_attributed"], check["reference_attributed"])
            checks.append({"artist": artist, **check})
            if not check["agrees"]:
                sampler_of[artist] = dataclasses.replace(
                    mimic, sampler="ddim", num_inference_steps=mimic.reference_steps
                )

    results, table_rows, grids_shown, resolved_best = [], [], [], []
    for cells, attacks in grids:
        best = {a: best_method([r for r in results if r["artist"] == a]) for a in artists}  # each artist's own
        for artist in artists:
            mimic_config = sampler_of[artist]
            every_cell = mimic.check_per_prompt and mimic_config.sampling() != mimic.sampling("reference")
            for raw in cells:
                spec = resolve(raw, best[artist])
                if spec != raw:
                    if (artist, raw, spec) not in resolved_best:
                        resolved_best.append((artist, raw, spec))
                    if (artist, parse_cell(spec).cloak_spec) in cloaks:  # planned as a cloak of its own
                        stages.unexpect("cloak")
                for attack in attacks:
                    lcm_check = lcm_control and (spec, attack, mimic_config) == ("clean", "none", mimic)
                    check = check_sampler if lcm_check or every_cell else None
                    cloaked, outcome = mimic_stage(artist, spec, attack, mimic_config, check)
                    low, high = outcome["protection_interval"]
                    sampler = _sampler_label(outcome["sampler"])
                    applied = parse_cell(spec).attack(attack)  # what the mimic's images went through
                    record = {
                        "artist": artist,
                        "cell": spec,
                        "adversary": applied,
                        **cloaked["values"],
                        **{k: v for k, v in outcome.items() if k not in ("images", "trained_on")},
                    }
                    if spec != raw:
                        record["cell_as_written"] = raw
                    results.append(record)
                    went = ", ".join(f"{a} {n}" for a, n in outcome["attributed_to"].items() if n)
                    values = cloaked["values"]
                    reduced = values.get("latent_distance_reduced")
                    table_rows.append(
                        [
                            artist,
                            spec,
                            applied,
                            f"{values['psnr']:.1f}" if "psnr" in values else "-",
                            f"{values['ssim']:.3f}" if "ssim" in values else "-",
                            f"{values['linf'] * 255:.1f}/255" if "linf" in values else "-",
                            "-" if reduced is None else f"{100 * reduced:.0f}%",
                            f"{100 * outcome['protection_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]",
                            outcome["generations"],
                            went,
                            f"{outcome['fid_to_held_out']:.2f}",
                            f"{outcome['clip_score']:.2f}",
                            sampler,
                            _check_label(outcome.get("sampler_check")),
                        ]
                    )
                    if attack == attacks[0] and not any(label == f"{artist} {spec}" for label, _ in grids_shown):
                        difference = ((cloaked["pixels"][:8] - data[artist]["clean"][:8]) * 10).clamp(-1, 1)
                        grids_shown.append(
                            (
                                f"{artist} {spec}",
                                [
                                    _uint8(data[artist]["clean"][:8]),
                                    _uint8(cloaked["pixels"][:8]),
                                    _uint8(difference),
                                    outcome["images"],
                                ],
                            )
                        )
    header = [
        "artist",
        "cloak",
        "adversary",
        "PSNR dB",
        "SSIM",
        "L-inf",
        "latent dist. reduced",
        "protection [95% CI]",
        "n",
        "generations went to",
        "FID to held-out",
        "CLIP score",
        "sampler",
        "reference sampler on the first generations: protection, paired agreement",
    ]
    table = _markdown_table(header, table_rows)
    markdown = [table]
    sections = [("protection", table)]
    if checks:
        check_table = _markdown_table(
            ["artist", "LCM: attributed to the artist", "DDIM: attributed [95% CI]", "agree", "cells sampled with"],
            [
                [
                    c["artist"],
                    f"{100 * c['distilled_attributed']['value']:.1f}%",
                    f"{100 * c['reference_attributed']['value']:.1f}% "
                    f"[{100 * c['reference_attributed']['low']:.1f}, {100 * c['reference_attributed']['high']:.1f}]",
                    "yes" if c["agrees"] else "NO: this artist's cells fall back to DDIM",
                    _sampler_label(sampler_of[c["artist"]].sampling()),
                ]
                for c in checks
            ],
        )
        title = "the LCM sampler against 25-step DDIM on the clean control (same mimic, prompts and seeds)"
        markdown.append(f"### {title}\n\n{check_table}")
        sections.append((title, check_table))
    if resolved_best:
        note = _markdown_table(["artist", "cell as written", "run as"], [list(row) for row in resolved_best])
        markdown.append(
            f"### 'best': for each artist, the method with the highest mean protection without an adversary\n\n{note}"
        )
        sections.append(("'best' cells", note))
    figure, axis = plt.subplots(figsize=(6, 4))
    for artist in artists:
        for method in dict.fromkeys(method_of(r["cell"]) for r in results if "psnr" in r):
            for attack in dict.fromkeys(r["adversary"] for r in results):
                points = [
                    r
                    for r in results
                    if r["artist"] == artist
                    and r["adversary"] == attack
                    and "psnr" in r
                    and method_of(r["cell"]) == method
                ]
                if len(points) < 2:
                    continue
                points.sort(key=lambda r: -r["psnr"])
                values = [100 * r["protection_rate"] for r in points]
                errors = [
                    [100 * (r["protection_rate"] - r["protection_interval"][0]) for r in points],
                    [100 * (r["protection_interval"][1] - r["protection_rate"]) for r in points],
                ]
                axis.errorbar(
                    [r["psnr"] for r in points],
                    values,
                    yerr=errors,
                    marker="o",
                    capsize=3,
                    label=f"{artist}, {method}, {attack}",
                )
    axis.set(
        xlabel="cloak budget (PSNR dB, lower = more visible)",
        ylabel="protection rate (%)",
        title="protection against budget (95% Wilson intervals)",
    )
    axis.invert_xaxis()
    if axis.lines:
        axis.legend(fontsize=6)
    sections.append(("protection against budget", "png:" + _png(figure)))
    plt.close(figure)
    for label, rows in grids_shown:
        sections.append(
            (
                f"{label}: original / cloaked / difference x10 / mimicked",
                "png:" + _grid_png(rows, ["original", "cloaked", "difference x10", "mimicked"]),
            )
        )
    figures = {
        "rows": results,
        "sampler_checks": checks,
        "samplers": {a: sampler_of[a].sampling() for a in artists},
        "best": [{"artist": a, "cell": raw, "run_as": spec} for a, raw, spec in resolved_best],
        "model_sha256": model_hash,
        "judge_sha256": judge_hash,
        "lcm_lora_sha256": lcm_hash,
        "cloak_code_sha256": cloak_code,
    }
    return figures, sections, "\n\n".join(markdown)


def bench(
    config_path: str | Path,
    out: str | Path,
    device="cpu",
    log=print,
    seed: int | None = None,
    overrides: dict | None = None,
    jobs: int = 1,
    stages_dir: str | Path | None = None,
) -> dict:
    """Run the experiment of ``config_path`` into ``out``; returns results.json's content. ``seed`` replaces the
    config's ``[experiment] seed`` when given; ``overrides`` ({table: {key: value}}) replace settings of its tables
    (results.json records the config as run). ``jobs`` > 1 (protection): the artists' stages run first in that many
    processes at once, each with its share of torch's threads (the artists' stages are independent), then this
    process writes the results and report from the cached stages. ``stages_dir`` (default ``out``/stages): where
    stages are cached; runs of different configs may share one, since a stage's key is the hash of its inputs
    (e.g. the cloak efficacy grid reuses the protection benchmark's cloaks and mimics)."""
    from .features import file_sha256

    config = load_config(config_path)
    if seed is not None:
        config["experiment"]["seed"] = seed
    for table, values in (overrides or {}).items():
        config.setdefault(table, {}).update(values)
    artists = config.get("protection", {}).get("artists", ["zenji", "tovik"])
    seed = config["experiment"].get("seed", 0)
    started = time.time()  # results.json's seconds: the whole run, the artists' processes included
    if jobs > 1 and config["experiment"]["kind"] == "protection" and len(artists) > 1:
        from .protection import cloak_code_sha256

        cloak_code_sha256()  # the merge below keys the cloak stages by the code the artists' processes start with
        _per_artist(config_path, out, device, log, seed, overrides or {}, artists, jobs, stages_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(Path(stages_dir) if stages_dir else out / "stages", log)
    torch.manual_seed(seed)
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


def _artist_worker(config_path, out, device, seed, overrides, artist, threads, log_queue, stages_dir) -> None:
    torch.set_num_threads(threads)
    changed = {**overrides, "protection": {**overrides.get("protection", {}), "artists": [artist]}}

    def log(line: str) -> None:
        log_queue.put(f"[{artist}] {line}")

    bench(config_path, out, device, log, seed, changed, stages_dir=stages_dir)


def _per_artist(config_path, out, device, log, seed, overrides, artists, jobs, stages_dir=None) -> None:
    """Each artist's stages in its own process, ``jobs`` at a time, their progress lines passed on to ``log``."""
    import multiprocessing
    import queue

    _toy_rows("train")  # the Toy Atelier is painted once, here, not by every process at once
    context = multiprocessing.get_context("spawn")
    log_queue = context.Queue()
    threads = max(1, torch.get_num_threads() // jobs)
    waiting, running, failed = list(artists), [], []
    while waiting or running:
        while waiting and len(running) < jobs:
            artist = waiting.pop(0)
            process = context.Process(
                target=_artist_worker,
                args=(str(config_path), str(out), str(device), seed, overrides, artist, threads, log_queue, stages_dir),
            )
            process.start()
            running.append((artist, process))
        try:
            log(log_queue.get(timeout=1.0))
        except queue.Empty:
            pass
        for artist, process in list(running):
            if not process.is_alive():
                running.remove((artist, process))
                if process.exitcode:
                    failed.append(artist)
    while not log_queue.empty():
        log(log_queue.get())
    if failed:
        raise FixativeError(f"the stages of {', '.join(failed)} failed (see the lines above); run again to resume")


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
