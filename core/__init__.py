"""fixative.core: our own Stable Diffusion — networks, checkpoint I/O, schedulers, pipelines, training step.

``core`` imports nothing of ``cloak``, ``consistency`` or ``eval``.
"""
