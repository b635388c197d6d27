import pytest

from fixative.core.toy import SHIPPED
from fixative.core.toy import build as toy_build


@pytest.fixture(scope="session")
def ci_build(tmp_path_factory):
    """A `ci`-size toy build (a few steps per stage; about half a minute)."""
    return toy_build.build(tmp_path_factory.mktemp("toy") / "ci", seed=0, size="ci", progress=False, log=lambda _: None)


@pytest.fixture(scope="session")
def shipped():
    """The toy world shipped in core/toy/weights."""
    if not (SHIPPED / "sd" / "model_index.json").is_file():
        pytest.skip("no toy weights shipped in this checkout")
    return SHIPPED
