"""fixative.cloak: protect artwork before publishing (Glaze, Mist, PhotoGuard, Anti-DreamBooth) under a perceptual
budget that holds on the stored file. Stands on fixative.core only.

    from fixative.cloak import cloak, CloakConfig, Budget
    results = cloak(["art.png"], load_model("toy"), CloakConfig(target_style="lumo", budget=Budget(psnr=32)))

``fixative.cloak.budget`` holds the suite's SSIM / PSNR / L-inf / LPIPS (eval imports them from there).
"""

from .api import CloakResult, cloak, cloak_files
from .budgets import Budget, parse_budget
from .optimise import OptimiserConfig
from .protect import CloakConfig

__all__ = ["Budget", "CloakConfig", "CloakResult", "OptimiserConfig", "cloak", "cloak_files", "parse_budget"]
