"""The LightningCLI configs in examples/configs/: each parses into the declared terms and trains.

Every ``*.yaml`` file there is picked up, so a new config is tested without touching this file.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from _tensorboard import read_scalars

from lightning_lossmix import LossMixModule, LossTerm, schedules

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted([*EXAMPLES.glob("configs/*.yaml"), *EXAMPLES.glob("configs/*.yml")])

# Lightning's CLI still calls jsonargparse APIs that jsonargparse 4.49+ deprecates; not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s).*(deprecated in v4|JsonargparseDeprecationWarning):DeprecationWarning"
)


def test_there_are_configs_to_test() -> None:
    assert CONFIGS, f"No LightningCLI config found in {EXAMPLES / 'configs'}."


@pytest.fixture(scope="module")
def cli_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lossmix_examples_cli", EXAMPLES / "cli.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # also puts examples/ on sys.path, as running it does
    return module


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A relative path left in a config lands in tmp_path, not in the repository; and the CLI
    # reads only the `args` it is given, not pytest's own command line.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def load_config(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path} should hold a mapping."
    return config


def declared_terms(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The term entries of the config's model, or None when the model's default is used."""
    init_args = config.get("model", {}).get("init_args", {})
    if "terms" not in init_args:
        return None
    return [entry.get("init_args", entry) for entry in init_args["terms"]]


def isolated(path: Path, tmp_path: Path) -> list[str]:
    """Arguments that read `path` and keep everything the run writes under `tmp_path`."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path), "name": "", "version": "cli"},
    }
    return [
        f"--config={path}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def import_class(class_path: str) -> type:
    # jsonargparse also accepts a schedule's bare class name.
    if "." not in class_path:
        return getattr(schedules, class_path)  # type: ignore[no-any-return]
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def assert_term_matches(term: LossTerm, entry: dict[str, Any]) -> None:
    assert term.name == entry["name"]
    assert term.mode == entry.get("mode", "min"), term.name
    weight = entry.get("weight", 1.0)
    if isinstance(weight, dict):
        cls = import_class(weight["class_path"])
        assert type(term.weight) is cls, (term.name, term.weight)
        for argument, value in weight.get("init_args", {}).items():
            assert getattr(term.weight, argument) == value, (term.name, argument)
    else:
        assert isinstance(term.weight, float), (term.name, term.weight)
        assert term.weight == float(weight), term.name


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_into_its_terms(path: Path, cli_module: ModuleType, tmp_path: Path) -> None:
    config = load_config(path)
    cli = cli_module.main(isolated(path, tmp_path), run=False)
    model = cli.model
    assert isinstance(model, LossMixModule)
    assert f"{type(model).__module__}.{type(model).__qualname__}" == config["model"]["class_path"]
    entries = declared_terms(config)
    if entries is None:
        default = inspect.signature(type(model)).parameters["terms"].default
        assert model.loss_mix.terms == tuple(default)
        return
    assert model.loss_mix.names == tuple(entry["name"] for entry in entries)
    for term, entry in zip(model.loss_mix.terms, entries, strict=True):
        assert_term_matches(term, entry)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_trains_a_few_steps(path: Path, cli_module: ModuleType, tmp_path: Path) -> None:
    steps = 4
    cli = cli_module.main(
        [
            "fit",
            *isolated(path, tmp_path),
            f"--trainer.max_steps={steps}",
            "--trainer.val_check_interval=2",
            "--trainer.check_val_every_n_epoch=1",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
        ]
    )
    assert cli.trainer.global_step == steps
    assert (tmp_path / "cli" / "config.yaml").is_file()  # LightningCLI saved the resolved config

    scalars = read_scalars(tmp_path / "cli")
    names = cli.model.loss_mix.names
    train_tags = [
        "train/loss",
        *(f"train/{kind}/{n}" for kind in ("loss", "weight") for n in names),
    ]
    val_tags = ["val/loss", *(f"val/loss/{n}" for n in names)]
    for tag in train_tags:
        assert len(scalars.get(tag, [])) == steps, tag
    for tag in val_tags:
        assert len(scalars.get(tag, [])) == steps // 2, tag
    for tag in train_tags + val_tags:
        assert all(math.isfinite(value) for _, value in scalars[tag]), tag


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_negative_weight_fails_with_the_lossmix_message(
    path: Path, cli_module: ModuleType, tmp_path: Path
) -> None:
    config = copy.deepcopy(load_config(path))
    entries = declared_terms(config)
    if not entries:
        pytest.skip(f"{path.name} declares no terms to corrupt.")
    entries[0]["weight"] = -1.0
    name = entries[0]["name"]
    bad = tmp_path / f"bad_{path.name}"
    bad.write_text(yaml.safe_dump(config))
    # jsonargparse wraps the LossMixError raised by LossTerm, keeping its message.
    message = f"LossTerm {name!r}: `weight` should be >= 0. Found `weight = -1.0`."
    fix = f"LossTerm({name!r}, weight=1.0, mode='max')"
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        cli_module.main(["fit", *isolated(bad, tmp_path)])
    assert fix in str(error.value)
    assert not (tmp_path / "cli").exists()  # it failed before training started


def test_a_balancer_comes_from_the_config_or_the_command_line(
    cli_module: ModuleType, tmp_path: Path
) -> None:
    from lightning_lossmix.balancing import GradientBalance, UncertaintyWeighting

    path = EXAMPLES / "configs" / "vae_balanced.yaml"
    balancer = cli_module.main(isolated(path, tmp_path), run=False).model.loss_mix.balancer
    assert isinstance(balancer, GradientBalance)
    assert balancer.balanced == ("recon_pixels", "recon_label")
    override = [
        "--model.init_args.balancer=lightning_lossmix.balancing.UncertaintyWeighting",
        "--model.init_args.balancer.init_args.regularizer=softplus",
    ]
    model = cli_module.main([*isolated(path, tmp_path), *override], run=False).model
    balancer = model.loss_mix.balancer
    assert isinstance(balancer, UncertaintyWeighting)
    assert balancer.regularizer_form == "softplus"
    # jsonargparse keeps the config's init_args that the new class also takes: `terms` here.
    assert balancer.balanced == ("recon_pixels", "recon_label")
    assert any(p is balancer.log_vars for p in model.parameters())
