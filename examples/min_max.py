"""How do I maximize one loss and minimize another? Declare the direction, keep it bounded.

A small regression net predicts the value of scikit-learn's handwritten digits (0-9) from their
pixels: the `fit` term (mean squared error) is minimized. At the same time it maximizes
`weights_up`, the mean of tanh of the mean of each weight tensor: the "maximize the sum of my
weights" of a frequent question, made bounded (at most 1) so that maximizing it cannot blow up,
and built with `torch.stack` so that it stays on the autograd graph. Its weight sets the
trade-off; the script prints both terms before and after training.

    python examples/min_max.py                # about 10 s on a laptop CPU
    python examples/min_max.py --weight 1.0   # a stronger pull on the weights
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DigitsDataModule

from lightning_lossmix import LossMixModule, LossTerm


class DigitsRegressor(LossMixModule):
    """Fits the digit value (min) while pushing the weights up, boundedly (max)."""

    def __init__(
        self,
        terms: Sequence[LossTerm] = (
            LossTerm("fit"),
            LossTerm("weights_up", weight=0.1, mode="max"),
        ),
        hidden: int = 32,
        lr: float = 1e-2,
    ) -> None:
        super().__init__(terms)
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        prediction = self.net(x).squeeze(-1)
        # torch.stack keeps every weight on the graph; torch.tensor([...]) here would cut it.
        weight_means = torch.stack([w.mean() for w in self.net.parameters()])
        return {
            "fit": nn.functional.mse_loss(prediction, y),
            "weights_up": torch.tanh(weight_means).mean(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def evaluate(model: DigitsRegressor, data: DigitsDataModule) -> dict[str, float]:
    model.eval()
    x, y = data.val_set.tensors
    with torch.no_grad():
        losses = model.compute_losses((x, y), 0)
    model.train()
    return {name: float(value) for name, value in losses.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight", type=float, default=0.1, help="weight of the max term")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--logdir", default="runs/min_max")
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    args = parser.parse_args(argv)

    pl.seed_everything(0, workers=True)
    data = DigitsDataModule(batch_size=64, target="value")
    data.setup()
    model = DigitsRegressor(
        [LossTerm("fit"), LossTerm("weights_up", weight=args.weight, mode="max")]
    )
    before = evaluate(model, data)
    trainer = pl.Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=5 if args.fast else None,
        logger=TensorBoardLogger(args.logdir, name=f"weight_{args.weight}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    trainer.fit(model, datamodule=data)
    after = evaluate(model, data)
    print(f"{'term':<12}{'mode':<6}{'start':>10}{'end':>10}   (validation set)")
    for term in model.loss_mix.terms:
        name = term.name
        print(f"{name:<12}{term.mode:<6}{before[name]:>10.4f}{after[name]:>10.4f}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
