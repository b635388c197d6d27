"""The layout of folders is the architecture: core imports nothing of cloak, consistency or eval."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "core": set(),
    "cloak": {"core"},
    "consistency": {"core"},
    "eval": {"core", "cloak", "consistency"},
}


def imported_fixative_packages(path: Path) -> set[str]:
    packages = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if node.level == 0 and parts[0] == "fixative" and len(parts) > 1:
                packages.add(parts[1])
            elif node.level >= 2 and path.relative_to(ROOT).parts[0] in ALLOWED:
                # `from ..cloak import x` climbs out of the package: count the first component
                depth = len(path.relative_to(ROOT).parts) - 1
                if node.level > depth:
                    packages.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fixative" and len(parts) > 1:
                    packages.add(parts[1])
    return packages


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(package):
    offenders = {}
    for path in (ROOT / package).rglob("*.py"):
        bad = imported_fixative_packages(path) - ALLOWED[package] - {package}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"layering violated: {offenders}"


def test_core_networks_do_not_import_diffusers():
    for name in ("unet.py", "vae.py", "text_encoder.py", "tokenizer.py"):
        path = ROOT / "core" / name
        if path.exists():
            tree = ast.parse(path.read_text())
            modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not modules & {"diffusers", "transformers"}, (
                f"{name} imports {modules & {'diffusers', 'transformers'}}"
            )


def core_modules_imported_by(path: Path) -> set[str]:
    """The core modules a core file imports ("pipelines", "toy", "toy.build", ...), relative or absolute."""
    package = path.relative_to(ROOT / "core").parent.parts  # the importing file's package inside core
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)]) if node.level > 1 else list(package)
                target = base + (node.module.split(".") if node.module else [])
                names = [".".join(target + [alias.name]) for alias in node.names] + [".".join(target)]
            elif node.module and node.module.startswith("fixative.core"):
                target = node.module.split(".")[2:]
                names = [".".join(target + [alias.name]) for alias in node.names] + [".".join(target)]
            else:
                continue
            modules.update(name for name in names if name)
        elif isinstance(node, ast.Import):
            modules.update(".".join(a.name.split(".")[2:]) for a in node.names if a.name.startswith("fixative.core."))
    return modules


NETWORKS = ("unet.py", "vae.py", "text_encoder.py", "tokenizer.py", "config.py")
ABOVE_NETWORKS = ("pipelines", "checkpoints", "single_file", "model", "toy", "cli", "training", "finetune")


@pytest.mark.parametrize("name", NETWORKS)
def test_networks_import_no_pipeline_checkpoint_or_toy_module(name):
    imported = core_modules_imported_by(ROOT / "core" / name)
    bad = sorted(m for m in imported if m.split(".")[0] in ABOVE_NETWORKS)
    assert not bad, f"core/{name} imports {bad}"


def test_nothing_in_core_outside_core_toy_imports_core_toy():
    offenders = {}
    for path in (ROOT / "core").rglob("*.py"):
        if path.relative_to(ROOT / "core").parts[0] == "toy":
            continue
        bad = sorted(m for m in core_modules_imported_by(path) if m == "toy" or m.startswith("toy."))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"core reaches up into core/toy: {offenders}"
