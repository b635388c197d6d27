"""fixative: protect artwork from style mimicry by text-to-image diffusion models.

The four parts install as ``fixative.core``, ``fixative.cloak``, ``fixative.consistency`` and
``fixative.eval``; this root package holds only the ``fixative`` command.
"""

__version__ = "0.1.0"
