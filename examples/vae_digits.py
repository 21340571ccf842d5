"""Why did multiplying one reconstruction loss by 20 make my VAE better? Look at the gradients.

A VAE on scikit-learn's bundled handwritten digits (8x8 pixels, no download) reconstructs two
things from one 2-dimensional latent code: the image (`recon_pixels`, Bernoulli likelihood summed
over 64 pixels) and the digit's label (`recon_label`, cross-entropy), with a KL term warmed up
linearly. It is trained twice: with equal weights, and with the label reconstruction x20.

`GradientMonitor` logs how hard each term pulls on the encoder, the shared decoder trunk and
each head. With equal weights, `recon_pixels` has almost all of the gradient on the encoder and
the trunk, so the latent code barely learns the label; the suggested weight of `recon_label`
says by how much to scale it. The script prints, for both runs, the label accuracy decoded from
the validation images' latent means, the pixel reconstruction error and the suggested weights.

    python examples/vae_digits.py                  # two runs, about a minute on a laptop CPU
    tensorboard --logdir runs/vae_digits           # Custom Scalars tab: one chart per group
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
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DigitsDataModule

from lightning_lossmix import LossMixModule, LossTerm, Player
from lightning_lossmix.callbacks import GradientMonitor
from lightning_lossmix.schedules import Linear


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
    ) -> None:
        super().__init__(terms)
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


def train(
    label_weight: float, args: argparse.Namespace, discriminator: bool = False
) -> dict[str, float]:
    pl.seed_everything(0, workers=True)
    data = DigitsDataModule(batch_size=64, target="label")
    data.setup()
    terms = [
        LossTerm("recon_pixels"),
        LossTerm("recon_label", weight=label_weight),
        LossTerm("kl", weight=Linear(0.0, 1.0, steps=300)),
    ]
    if discriminator:
        terms += [LossTerm("realism", weight=5.0), LossTerm("disc_real"), LossTerm("disc_fake")]
    model = DigitsVAEGAN(terms) if discriminator else DigitsVAE(terms)
    monitor = GradientMonitor(every_n_steps=10)
    name = "equal_weights" if label_weight == 1.0 else f"label_x{label_weight:g}"
    name += "_discriminator" if discriminator else ""
    trainer = pl.Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=10 if args.fast else None,
        logger=TensorBoardLogger(args.logdir, name="", version=name),
        callbacks=[monitor],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    result = quality(model, data)
    for term in ("recon_pixels", "recon_label", "kl"):
        result[f"suggested/{term}"] = monitor.last_metrics.get(f"grad_suggested_weight/{term}", 0)
        result[f"share/{term}"] = monitor.last_metrics.get(f"grad_share/encoder/{term}", 0)
    result["run"] = name  # type: ignore[assignment]
    return result


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
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
    args = parser.parse_args(argv)

    results = [train(1.0, args), train(args.boost, args)]
    if args.discriminator:
        results.append(train(args.boost, args, discriminator=True))
    print()
    print(
        f"{'run':<16}{'label acc.':>11}{'pixel err.':>11}   encoder share (pixels/label/kl)"
        "   suggested weights (pixels/label/kl)"
    )
    for r in results:
        shares = "/".join(f"{r[f'share/{t}']:.2f}" for t in ("recon_pixels", "recon_label", "kl"))
        suggested = "/".join(
            f"{r[f'suggested/{t}']:.2g}" for t in ("recon_pixels", "recon_label", "kl")
        )
        print(
            f"{r['run']:<16}{r['label_accuracy']:>11.3f}{r['pixel_error']:>11.4f}   "
            f"{shares:<32}   {suggested}"
        )
    print(f"\nTensorBoard logs: {args.logdir}  (tensorboard --logdir {args.logdir})")
    return results


if __name__ == "__main__":
    main()
