"""A GAN with two players that take turns: how many of the 8 modes of a ring does it cover?

The data are 8 Gaussians on a circle (radius 2, standard deviation 0.05), the usual test of
mode collapse (Metz et al., 2017). The `discriminator` player minimizes `real` and `fake`, its
binary cross-entropies on data and on generated points; the `generator` player minimizes `fool`,
the non-saturating generator loss. `LossMixModule` alternates them on each batch with their own
optimizers (Lightning's manual optimization, done by the base class), logs each player's total
and each term, and `GradientMonitor` measures each player's gradients.

The script prints, at the start and at the end, how many modes have at least 1% of 2000
generated points within 3 standard deviations, and the share of such high-quality points.

    python examples/gan_ring.py             # about 9 s on a 2-core CPU
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm, Player
from lightning_lossmix.callbacks import GradientMonitor

MODES = 8
RADIUS = 2.0
STD = 0.05
LATENT = 8


def centers() -> Tensor:
    angles = torch.arange(MODES) * 2 * math.pi / MODES
    return RADIUS * torch.stack([angles.cos(), angles.sin()], dim=-1)


def ring(n: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    which = torch.randint(0, MODES, (n,), generator=generator)
    return centers()[which] + STD * torch.randn(n, 2, generator=generator)


def mlp(inputs: int, outputs: int, width: int = 128) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, outputs),
    )  # fmt: skip


class RingGAN(LossMixModule):
    """Two players: the discriminator (real, fake) and the generator (fool)."""

    def __init__(
        self,
        terms: Sequence[LossTerm] = (LossTerm("real"), LossTerm("fake"), LossTerm("fool")),
        players: Sequence[Player] = (
            Player("discriminator", terms=("real", "fake")),
            Player("generator", terms=("fool",)),
        ),
        lr: float = 1e-3,
    ) -> None:
        super().__init__(terms, players=players)
        self.lr = lr
        self.discriminator = mlp(2, 1)
        self.generator = mlp(LATENT, 2)

    def sample(self, n: int) -> Tensor:
        return self.generator(torch.randn(n, LATENT, device=self.device))

    def compute_losses(
        self, batch: tuple[Tensor], batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        (real,) = batch
        if player == "generator":
            logits = self.discriminator(self.sample(len(real)))
            return {"fool": F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))}
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(self.sample(len(real)).detach())
        return {
            "real": F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)),
            "fake": F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)),
        }

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # One optimizer per player, in the players' order.
        return [
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=(0.5, 0.999)),
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=(0.5, 0.999)),
        ]


def coverage(model: RingGAN, n: int = 2000) -> tuple[int, float]:
    """(modes with >= 1% of the samples within 3 std, share of such high-quality samples)."""
    with torch.no_grad():
        points = model.sample(n)
    distances = torch.cdist(points, centers())
    nearest = distances.min(dim=1)
    good = nearest.values < 3 * STD
    counts = torch.bincount(nearest.indices[good], minlength=MODES)
    return int((counts >= 0.01 * n).sum()), good.float().mean().item()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--logdir", default="runs/gan_ring")
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    args = parser.parse_args(argv)

    pl.seed_everything(0, workers=True)
    data = DataLoader(TensorDataset(ring(256 * 40, seed=0)), batch_size=256, shuffle=True)
    model = RingGAN()
    modes_before, quality_before = coverage(model)
    logger = TensorBoardLogger(args.logdir, name="")  # a new version_N at each invocation
    every = 2 if args.fast else 50  # the fast run is 5 batches: measure some of them
    pl.Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=5 if args.fast else None,
        logger=logger,
        callbacks=[GradientMonitor(every_n_steps=every)],
        log_every_n_steps=every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, data)
    modes, quality = coverage(model)
    print(f"\n{'':<8}{'modes covered':>14}{'high-quality samples':>22}")
    print(f"{'start':<8}{modes_before:>11} / {MODES}{quality_before:>22.1%}")
    print(f"{'end':<8}{modes:>11} / {MODES}{quality:>22.1%}")
    print(f"\nTensorBoard logs: {logger.log_dir}")
    return {"modes": modes, "high_quality": quality}


if __name__ == "__main__":
    main()
