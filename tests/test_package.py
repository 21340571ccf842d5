"""The package root: its names, imported on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_lossmix


def test_every_public_name_is_there_and_a_misspelled_one_is_an_attribute_error() -> None:
    namespace: dict[str, object] = {}
    exec("from lightning_lossmix import *", namespace)
    assert set(lightning_lossmix.__all__) <= set(namespace)
    assert set(lightning_lossmix.__all__) <= set(dir(lightning_lossmix))
    from lightning_lossmix._module import LossMixModule

    assert lightning_lossmix.LossMixModule is LossMixModule
    with pytest.raises(AttributeError, match="no attribute 'LossMixModul'"):
        _ = lightning_lossmix.LossMixModul  # type: ignore[attr-defined]


def test_importing_the_root_imports_no_part_until_used() -> None:
    code = (
        "import sys, lightning_lossmix\n"
        "print('torch' in sys.modules, 'lightning' in sys.modules)\n"
        "lightning_lossmix.LossTerm\n"
        "print('torch' in sys.modules, 'lightning_lossmix._module' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False", "True", "False"]
