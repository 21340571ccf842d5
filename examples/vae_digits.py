"""Why did multiplying one reconstruction loss by 20 make my VAE better? Look at the gradients.

A VAE on scikit-learn's bundled handwritten digits (8x8 pixels, no download) reconstructs two
things from one 2-dimensional latent code: the image (`recon_pixels`, Bernoulli likelihood summed
over 64 pixels) and the digit's label (`recon_label`, cross-entropy), with a KL term warmed up
linearly. It is trained twice: with equal weights, and with the label reconstruction x20.

`GradientMonitor` logs how hard each term pulls on the encoder, the shared decoder trunk and
each head. With equal weights, `recon_pixels` and `kl` take most of the gradient on the encoder
(the label about 15 % at the end; the pixels almost all of it in the first steps), so the latent
code barely learns the label; the suggested weight of `recon_label`
says by how much to scale it. The script prints, for both runs, the label accuracy decoded from
the validation images' latent means, the pixel reconstruction error and the suggested weights.
Each invocation writes its runs into a fresh folder, runs/vae_digits/version_N/<run>.

    python examples/vae_digits.py                  # two runs, about 10 s on a 2-core CPU
    python examples/vae_digits.py --report         # and draw their report (needs matplotlib)
    python examples/vae_digits.py --balance GradientBalance  # + equal weights, balanced
    tensorboard --logdir runs/vae_digits           # Custom Scalars tab: one chart per group
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DigitsDataModule
from _runs import new_run_folder

from lightning_lossmix import LossMixModule, LossTerm, Player
from lightning_lossmix.balancing import (
    DWA,
    FAMO,
    Balancer,
    GradientBalance,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)
from lightning_lossmix.callbacks import GradientMonitor
from lightning_lossmix.schedules import Linear

TERMS = ("recon_pixels", "recon_label", "kl")
#: `--balance NAME`: a run with equal declared weights and this balancer at its defaults.
BALANCERS: dict[str, type[Balancer]] = {
    cls.__name__: cls
    for cls in (GradientBalance, UncertaintyWeighting, GradNorm, DWA, FAMO, RandomLossWeighting)
}


class DigitsVAE(LossMixModule):
    """A VAE whose latent code reconstructs the pixels and the label of a digit."""

    def __init__(
        self,
        terms: Sequence[LossTerm] = (
            LossTerm("recon_pixels"),
            LossTerm("recon_label"),
            LossTerm("kl", weight=Linear(0.0, 1.0, steps=300)),
        ),
        latent: int = 2,
        hidden: int = 128,
        lr: float = 2e-3,
        balancer: Balancer | None = None,
    ) -> None:
        super().__init__(terms, balancer=balancer)
        self.lr = lr
        self.encoder = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent)
        )
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU())
        self.pixel_head = nn.Linear(hidden, 64)
        self.label_head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if self.training else mean
        trunk = self.decoder(z)
        return self.pixel_head(trunk), self.label_head(trunk), mean, log_var

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        pixel_logits, label_logits, mean, log_var = self(x)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)
        return {
            "recon_pixels": F.binary_cross_entropy_with_logits(pixel_logits, x, reduction="none")
            .sum(-1)
            .mean(),
            "recon_label": F.cross_entropy(label_logits, y),
            "kl": kl.mean(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsVAEGAN(DigitsVAE):
    """The VAE plus a discriminator that tells images from reconstructions: two players.

    The `vae` player also minimizes `realism`, the discriminator's cross-entropy on its
    reconstructions labelled as real; the `discriminator` player minimizes `disc_real` and
    `disc_fake`. The base class alternates them on each batch.
    """

    def __init__(self, terms: Sequence[LossTerm], lr: float = 2e-3) -> None:
        vae_terms = [t.name for t in terms if not t.name.startswith("disc_")]
        players = [
            Player("vae", terms=vae_terms),
            Player("discriminator", terms=["disc_real", "disc_fake"]),
        ]
        LossMixModule.__init__(self, terms, players=players)
        self.lr = lr
        latent, hidden = 2, 128
        self.encoder = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent)
        )
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU())
        self.pixel_head = nn.Linear(hidden, 64)
        self.label_head = nn.Linear(hidden, 10)
        self.discriminator = nn.Sequential(nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))

    def compute_losses(  # type: ignore[override]
        self, batch: tuple[Tensor, Tensor], batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        x, _ = batch
        if player == "discriminator":
            with torch.no_grad():
                fake = torch.sigmoid(self(x)[0])
            real_logits, fake_logits = self.discriminator(x), self.discriminator(fake)
            return {
                "disc_real": F.binary_cross_entropy_with_logits(
                    real_logits, torch.ones_like(real_logits)
                ),
                "disc_fake": F.binary_cross_entropy_with_logits(
                    fake_logits, torch.zeros_like(fake_logits)
                ),
            }
        losses = dict(super().compute_losses(batch, batch_idx))
        logits = self.discriminator(torch.sigmoid(self(x)[0]))
        losses["realism"] = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        return losses

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        vae = [p for n, p in self.named_parameters() if not n.startswith("discriminator")]
        return [
            torch.optim.Adam(vae, lr=self.lr),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr),
        ]


def quality(model: DigitsVAE, data: DigitsDataModule) -> dict[str, float]:
    """Label accuracy and pixel error decoded from the latent means of the validation set."""
    model.eval()
    x, y = data.val_set.tensors
    with torch.no_grad():
        pixel_logits, label_logits, _, _ = model(x)
    model.train()
    return {
        "label_accuracy": (label_logits.argmax(-1) == y).float().mean().item(),
        "pixel_error": (torch.sigmoid(pixel_logits) - x).abs().mean().item(),
    }


@dataclass
class Run:
    """One training run of the comparison: its name (and folder), its terms and its model."""

    name: str
    terms: list[LossTerm]
    model: type[DigitsVAE] = DigitsVAE
    callbacks: list[pl.Callback] = field(default_factory=list)
    balancer: type[Balancer] | None = None
    balanced: list[str] | None = None


def vae_terms(label_weight: float) -> list[LossTerm]:
    return [
        LossTerm("recon_pixels"),
        LossTerm("recon_label", weight=label_weight),
        LossTerm("kl", weight=Linear(0.0, 1.0, steps=300)),
    ]


def plan(args: argparse.Namespace) -> list[Run]:
    """The runs to compare: equal weights, the label x20, and the options' extra runs."""
    boosted = f"label_x{args.boost:g}"
    runs = [Run("equal_weights", vae_terms(1.0)), Run(boosted, vae_terms(args.boost))]
    if args.discriminator:
        players = [LossTerm("realism", weight=5.0), LossTerm("disc_real"), LossTerm("disc_fake")]
        runs.append(Run(f"{boosted}_discriminator", vae_terms(args.boost) + players, DigitsVAEGAN))
    weight = args.balance_label_weight
    prefix = "equal" if weight == 1.0 else f"label_{weight:g}"
    for name in args.balance or ():
        balanced = args.balance_terms
        suffix = "" if balanced is None else "_" + "_".join(balanced)
        runs.append(
            Run(
                f"{prefix}_{name}{suffix}",
                vae_terms(args.balance_label_weight),
                balancer=BALANCERS[name],
                balanced=balanced,
            )
        )
    return runs


def train(run: Run, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    pl.seed_everything(0, workers=True)
    data = DigitsDataModule(batch_size=64, target="label")
    data.setup()
    balancer = None if run.balancer is None else run.balancer(terms=run.balanced)
    model = run.model(run.terms) if balancer is None else DigitsVAE(run.terms, balancer=balancer)
    monitor = GradientMonitor(every_n_steps=10)
    logger = TensorBoardLogger(folder, name="", version=run.name)
    trainer = pl.Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=10 if args.fast else None,
        logger=logger,
        callbacks=[monitor, *run.callbacks],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    result: dict[str, Any] = {"run": run.name, "log_dir": logger.log_dir, **quality(model, data)}
    for term in TERMS:
        result[f"suggested/{term}"] = monitor.last_metrics.get(f"grad_suggested_weight/{term}", 0)
        result[f"share/{term}"] = monitor.last_metrics.get(f"grad_share/encoder/{term}", 0)
    return result


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The results, one row per run, every column as wide as its widest cell."""
    header = [
        "run",
        "label acc.",
        "pixel err.",
        "encoder share (pixels/label/kl)",
        "suggested weights (pixels/label/kl)",
    ]
    rows = [
        [
            r["run"],
            f"{r['label_accuracy']:.3f}",
            f"{r['pixel_error']:.4f}",
            "/".join(f"{r[f'share/{t}']:.2f}" for t in TERMS),
            "/".join(f"{r[f'suggested/{t}']:.2g}" for t in TERMS),
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numbers = {1, 2}  # right-aligned

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if i in numbers else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "   ".join(padded).rstrip()

    return "\n".join(line(cells) for cells in [header, *rows])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--boost", type=float, default=20.0, help="weight of recon_label, run 2")
    parser.add_argument("--logdir", default="runs/vae_digits")
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    parser.add_argument(
        "--discriminator",
        action="store_true",
        help="a third run: the x20 VAE with a discriminator on its reconstructions (players)",
    )
    parser.add_argument(
        "--balance",
        action="append",
        choices=list(BALANCERS),
        metavar="NAME",
        help=f"one more run: equal weights and this balancer ({', '.join(BALANCERS)}); repeatable",
    )
    parser.add_argument(
        "--balance-terms",
        nargs="+",
        choices=TERMS,
        help="the terms the --balance runs balance (default: all three)",
    )
    parser.add_argument(
        "--balance-label-weight",
        type=float,
        default=1.0,
        help="declared weight of recon_label in the --balance runs (default 1: equal weights)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="draw the runs' report (lightning-lossmix report; needs matplotlib)",
    )
    args = parser.parse_args(argv)

    folder = new_run_folder(args.logdir)  # a fresh version_N: a re-run never appends
    results = [train(run, args, folder) for run in plan(args)]
    print()
    print(format_table(results))
    print(f"\nTensorBoard logs: {folder}  (tensorboard --logdir {args.logdir})")
    if args.report:
        from lightning_lossmix.report import write_report

        page = write_report([folder], folder / "report")
        print(f"Report: {page}  (lightning-lossmix report {folder} -o {folder / 'report'})")
    return results


if __name__ == "__main__":
    main()
