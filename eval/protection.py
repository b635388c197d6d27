"""The protection grid's pieces (``fixative bench``, kind = "protection"; ``benchmarks/cloak_efficacy.py``): the
cell spec, the cloak stage and the mimicry stage of one cell, and the method a "best" cell stands for.

A cell spec is ``METHOD[:ITEM]...``:

    METHOD   clean (the control: the artist's own images), plain (issue 10's reference recipe: glaze's objective,
             img2img target at strength 0.6, 100 Adam steps at lr 0.01), glaze, mist, photoguard, anti-dreambooth,
             or best (the cloak method with the highest mean protection without an adversary in the grids before)
    budget   METRIC=VALUE, repeatable: psnr=32, linf=16/255, ssim=0.95, lpips=0.07 (default psnr=32)
    options  steps=N, lr=X, pgd or optimiser=pgd|adam, alpha=A (the soft budget penalty's weight),
             strength=S (glaze's img2img target),
             target=STYLE (glaze's target style; default the benchmark's per-artist target), eot (expectation over
             jpeg, resize, blur and noise), robust=T,T (those transforms of your choice), weight=W (mist's
             semantic weight), pool=K, semantic=W (glaze's --latent-pool and --semantic-weight), captions
             (glaze's semantic prompt per painting: "{caption} by {style}", each caption "a painting of a
             SUBJECT"), every=N, slr=X (anti-dreambooth's surrogate updates), jpeg (the published images go
             through JPEG-75 before mimicry: adversary jpeg:75 before each of the cell's adversaries)

Items may also be joined with '+', and the cloak lab's short names work: t=STYLE, st=S, opt=pgd, adb
(``adb+t=lumo+psnr=24+steps=100`` is ``anti-dreambooth:target=lumo:psnr=24:steps=100``).

Options not given come from the benchmark's ``[protection.cloak]`` table, then from ``cloak.CloakConfig``'s defaults
(plain's recipe overrides the table; the cell's own options override both).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fixative.core.errors import FixativeError

METHODS = ("clean", "plain", "glaze", "mist", "photoguard", "anti-dreambooth", "best")
PLAIN = {"steps": 100, "lr": 0.01, "strength": 0.6}  # issue 10's reference recipe, with glaze's objective
OPTION_TYPES = {
    "steps": int,
    "lr": float,
    "alpha": float,
    "optimiser": str,
    "strength": float,
    "weight": float,
    "pool": int,
    "semantic": float,
    "every": int,
    "slr": float,
    "target": str,
    "robust": lambda text: tuple(t for t in text.split(",") if t),
}
CAPTION_PROMPT = "{caption} by {style}"  # with the toy captions "a painting of a SUBJECT": the toy's own caption form
FLAGS = {
    "pgd": ("optimiser", "pgd"),
    "eot": ("robust", ("jpeg", "resize", "blur", "noise")),
    "captions": ("semantic_prompt", CAPTION_PROMPT),
}
ALIASES = {"t": "target", "st": "strength", "opt": "optimiser", "adb": "anti-dreambooth"}  # the cloak lab's names
JPEG_BEFORE_MIMICRY = "jpeg:75"


@dataclass(frozen=True)
class Cell:
    """A parsed cell spec (see the module docstring)."""

    spec: str
    method: str
    budget: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    jpeg: bool = False

    @property
    def cloak_spec(self) -> str:
        """The spec without ``jpeg``: what the cloak stage depends on."""
        return ":".join(part for part in re.split(r"[:+]", self.spec) if part != "jpeg")

    def attack(self, adversary: str) -> str:
        """The adversary spec applied before mimicry: ``adversary`` ("none" or "a+b"), after JPEG-75 for ``jpeg``."""
        if not self.jpeg:
            return adversary
        return JPEG_BEFORE_MIMICRY if adversary == "none" else f"{JPEG_BEFORE_MIMICRY}+{adversary}"


def method_of(spec: str) -> str:
    """A cell spec's method (short names resolved)."""
    method = re.split(r"[:+]", spec.strip())[0]
    return ALIASES.get(method, method)


def _option(key: str, text: str, where: str):
    try:
        return OPTION_TYPES[key](text)
    except ValueError:
        raise FixativeError(f"{where}: {key}={text!r} is not a number") from None


def parse_cell(spec: str) -> Cell:
    """``glaze:psnr=32:steps=50:pgd`` -> Cell; a bad spec is a one-line FixativeError naming it."""
    from fixative.cloak import parse_budget

    method, parts = method_of(spec), re.split(r"[:+]", spec.strip())[1:]
    if method not in METHODS:
        raise FixativeError(f"cell {spec!r}: the method must be one of {', '.join(METHODS)}, got {method!r}")
    budget, options, jpeg = [], {}, False
    for part in filter(None, parts):
        key, sep, text = part.partition("=")
        key = ALIASES.get(key, key)
        if part == "jpeg":
            jpeg = True
        elif part in FLAGS:
            options[FLAGS[part][0]] = FLAGS[part][1]
        elif sep and key in OPTION_TYPES:
            options[key] = _option(key, text, f"cell {spec!r}")
        else:
            budget.append(part)
    if budget:
        try:
            parse_budget(budget)
        except FixativeError as error:
            raise FixativeError(f"cell {spec!r}: {error}") from None
    if method == "clean" and (budget or options):
        raise FixativeError(f"cell {spec!r}: the clean control takes no budget or options (only jpeg)")
    return Cell(spec.strip(), method, tuple(budget), options, jpeg)


def check_defaults(defaults: dict) -> dict:
    """The ``[protection.cloak]`` table: the cell options, as TOML values."""
    unknown = sorted(set(defaults) - set(OPTION_TYPES))
    if unknown:
        raise FixativeError(
            f"[protection.cloak]: unknown setting(s) {', '.join(unknown)}; use {', '.join(OPTION_TYPES)}"
        )
    return {k: tuple(v) if k == "robust" else v for k, v in defaults.items()}


def cloak_config(cell: Cell, seed: int, defaults: dict | None = None):
    """The ``cloak.CloakConfig`` of a (non-clean, resolved) cell."""
    from fixative.cloak import Budget, CloakConfig, OptimiserConfig, parse_budget
    from fixative.cloak.targets import StyleTargetConfig

    if cell.method in ("clean", "best"):
        raise FixativeError(f"cell {cell.spec!r} has no cloak of its own")
    options = {**check_defaults(defaults or {}), **(PLAIN if cell.method == "plain" else {}), **cell.options}
    optimiser = OptimiserConfig()
    for key in ("steps", "lr", "optimiser", "alpha"):
        if key in options:
            setattr(optimiser, key, options[key])
    style_target = StyleTargetConfig()
    if "strength" in options:
        style_target.strength = options["strength"]
    config = CloakConfig(
        method="glaze" if cell.method == "plain" else cell.method,
        budget=parse_budget(list(cell.budget)) if cell.budget else Budget(psnr=32),
        optimiser=optimiser,
        style_target=style_target,
        robust=tuple(options.get("robust", ())),
        seed=seed,
    )
    if "weight" in options:
        config.mist_semantic_weight = options["weight"]
    config.latent_pool = options.get("pool", config.latent_pool)
    config.semantic_weight = options.get("semantic", config.semantic_weight)
    config.semantic_prompt = options.get("semantic_prompt", config.semantic_prompt)
    if "every" in options:
        config.aspl.every = options["every"]
    if "slr" in options:
        config.aspl.surrogate_lr = options["slr"]
    return config


@functools.cache
def cloak_code_sha256() -> str:
    """One hash over the cloak package's source: a changed method recomputes its cached cloak stages. Read once per
    process, so a run keys its stages by the code it started with, even when the source is edited while it runs."""
    import fixative.cloak

    from .features import folder_sha256

    return folder_sha256(Path(fixative.cloak.__file__).parent, (".py",))


def cloak_cell(
    model,
    clean: torch.Tensor,
    cell: Cell,
    seed: int,
    style: str | None,
    defaults: dict | None,
    captions: list[str] | None = None,
) -> dict:
    """The cloak stage: {"pixels": stored pixels in [-1, 1], "values": mean PSNR / SSIM / L-inf and what the cloak
    reached}; ``clean`` in [-1, 1]; ``captions``: the paintings' (for the ``captions`` option). The clean control
    returns the clean pixels."""
    from fixative.cloak.protect import cloak_pixels

    if cell.method == "clean":
        return {"pixels": clean, "values": {}}
    config = cloak_config(cell, seed, defaults)
    stored, records = cloak_pixels(
        model, (clean + 1) / 2, config, style=cell.options.get("target", style), captions=captions
    )
    values = {k: sum(r["values"][k] for r in records) / len(records) for k in ("psnr", "ssim", "linf")}
    before = [r.get("latent_distance_before") for r in records]
    after = [r.get("latent_distance_after") for r in records]
    if before and None not in before and None not in after and sum(before) > 0:
        values["latent_distance_reduced"] = 1 - sum(after) / sum(before)
    values["final_projection"] = sum(bool(r.get("final_projection")) for r in records)
    return {"pixels": stored * 2 - 1, "values": values}


def best_method(rows: list[dict]) -> str | None:
    """The cloak method (by the method of each row's cell) with the highest mean protection rate over the rows
    without an adversary, across artists and budgets; the first such method on a tie; None without cloaked rows."""
    means: dict[str, list[float]] = {}
    for row in rows:
        method = method_of(row["cell"])
        if method not in ("clean", "best") and row["adversary"] == "none":
            means.setdefault(method, []).append(row["protection_rate"])
    if not means:
        return None
    return max(means, key=lambda m: sum(means[m]) / len(means[m]))


def resolve(spec: str, best: str | None) -> str:
    """A "best:..." spec with the best method put in; other specs unchanged."""
    if method_of(spec) != "best":
        return spec
    if best is None:
        raise FixativeError(
            f"cell {spec!r}: 'best' needs an earlier grid with cloaked cells run without an adversary ('none')"
        )
    return best + spec.strip()[len("best") :]
