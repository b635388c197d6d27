"""fixative.cloak: protect artwork before publishing (Glaze, Mist, PhotoGuard, Anti-DreamBooth) under a perceptual
budget that holds on the stored file. Stands on fixative.core only.

    from fixative.cloak import cloak, CloakConfig, Budget
    results = cloak(["art.png"], load_model("toy"), CloakConfig(target_style="lumo", budget=Budget(psnr=32)))

``fixative.cloak.budget`` holds the suite's SSIM / PSNR / L-inf / LPIPS (eval imports them from there).
"""

_EXPORTS = {
    "CloakResult": "api",
    "cloak": "api",
    "cloak_files": "api",
    "Budget": "bounds",
    "parse_budget": "bounds",
    "OptimiserConfig": "optimise",
    "CloakConfig": "protect",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import on first use, so that ``fixative --help`` (which imports fixative.cloak.cli) stays light."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fixative.cloak' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
