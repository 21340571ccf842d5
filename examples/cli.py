"""Train any LossMixModule from a YAML config with LightningCLI.

    python examples/cli.py fit --config examples/configs/min_max.yaml
    python examples/cli.py fit --config examples/configs/min_max.yaml \
        --trainer.max_epochs 3 --print_config
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_lossmix import LossMixModule


def main(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        LossMixModule,
        subclass_mode_model=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
