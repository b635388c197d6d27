"""core's sub-commands of the ``fixative`` command (entry point ``fixative.commands: core``).

Each module here adds its sub-commands; heavy imports (torch, models) happen inside the command
functions so that ``fixative --help`` stays fast. The toy world registers its own (``fixative.core.toy.cli``).
"""

from . import finetune, generate, models


def register(subparsers) -> None:
    models.register(subparsers)
    generate.register(subparsers)
    finetune.register(subparsers)
