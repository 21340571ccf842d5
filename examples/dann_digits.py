"""Domain adaptation on digits: features that maximize what a domain classifier minimizes.

Source domain: scikit-learn's handwritten digits, with labels. Target domain: other digits
with a smudge, random intensities over their central 4x4 pixels, without labels. A classifier
trained on the source alone transfers badly. DANN (Ganin et al., 2016) adds a domain classifier
on the features and a `GradientReversal` layer between them, with the DANN schedule on its
scale: the domain head minimizes its loss while the feature extractor maximizes it, so the
features stop telling the domains apart and the label classifier transfers. The script trains
both and prints their measured source and target accuracy.

    python examples/dann_digits.py          # about 6 s on a 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import digits_tensors

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.nn import GradientReversal
from lightning_lossmix.schedules import DANN


def domains(seed: int = 0) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Labelled source (train), unlabelled target (train) and labelled target (test) sets."""
    x, y = digits_tensors(seed)
    generator = torch.Generator().manual_seed(seed)
    # A smudge: random intensities over the central 4x4 pixels, where strokes tell digits apart.
    target = x.clone().view(-1, 8, 8)
    target[:, 2:6, 2:6] = torch.rand(len(x), 4, 4, generator=generator)
    target = target.view(-1, 64)
    half = len(x) // 2  # source and target come from different digits
    return (
        TensorDataset(x[:half], y[:half]),
        TensorDataset(target[half:]),
        TensorDataset(target[half:], y[half:]),
    )


class PairedLoader:
    """Batches of (source x, source y, target x): the target set cycles to match the source."""

    def __init__(self, source: TensorDataset, target: TensorDataset, batch_size: int) -> None:
        self.source = DataLoader(source, batch_size, shuffle=True, drop_last=True)
        self.target = DataLoader(target, batch_size, shuffle=True, drop_last=True)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):  # type: ignore[no-untyped-def]
        target = iter(self.target)
        for x, y in self.source:
            try:
                (t,) = next(target)
            except StopIteration:
                target = iter(self.target)
                (t,) = next(target)
            yield x, y, t


class DigitsDANN(LossMixModule):
    """Features -> label classifier; features -> gradient reversal -> domain classifier."""

    def __init__(
        self,
        terms: Sequence[LossTerm] = (LossTerm("label"), LossTerm("domain")),
        adversarial: bool = True,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(terms)
        self.adversarial = adversarial
        self.lr = lr
        self.features = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 10)
        self.reverse = GradientReversal(DANN(gamma=10.0))
        self.domain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def compute_losses(self, batch: tuple[Tensor, ...], batch_idx: int) -> Mapping[str, Tensor]:
        x, y, t = batch
        source, target = self.features(x), self.features(t)
        features = torch.cat([source, target])
        if not self.adversarial:  # source only: the domain head learns, the features ignore it
            features = features.detach()
        logits = self.domain(self.reverse(features)).squeeze(-1)
        # On the logits' device: torch.zeros(n) would stay on the CPU under a GPU fit.
        is_target = torch.cat([logits.new_zeros(len(x)), logits.new_ones(len(t))])
        return {
            "label": F.cross_entropy(self.classifier(source), y),
            "domain": F.binary_cross_entropy_with_logits(logits, is_target),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def accuracy(self, data: TensorDataset) -> float:
        x, y = data.tensors
        self.eval()
        with torch.no_grad():
            correct = (self.classifier(self.features(x)).argmax(-1) == y).float().mean()
        self.train()
        return correct.item()


def train(adversarial: bool, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, workers=True)
    source, target, target_test = domains(args.seed)
    model = DigitsDANN(adversarial=adversarial)
    name = "dann" if adversarial else "source_only"
    logger = TensorBoardLogger(args.logdir, name=name)  # a new version_N at each invocation
    pl.Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=5 if args.fast else None,
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, PairedLoader(source, target, batch_size=64))
    return {
        "source_accuracy": model.accuracy(source),
        "target_accuracy": model.accuracy(target_test),
        "log_dir": logger.log_dir,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs/dann_digits")
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    args = parser.parse_args(argv)
    results = {"source only": train(False, args), "DANN": train(True, args)}
    print(f"\n{'model':<14}{'source acc.':>12}{'target acc.':>12}")
    for name, r in results.items():
        print(f"{name:<14}{r['source_accuracy']:>12.3f}{r['target_accuracy']:>12.3f}")
    print("\nTensorBoard logs: " + ", ".join(str(r["log_dir"]) for r in results.values()))
    return results


if __name__ == "__main__":
    main()
