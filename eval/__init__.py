"""fixative.eval — all measurement: metrics (FID, KID, CLIP score, LPIPS, SSIM, PSNR), rates with intervals,
attribution judges, the mimicry attack and its adversaries. Stands on core, cloak and consistency."""
