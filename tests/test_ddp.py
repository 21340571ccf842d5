"""LossMixModule under DDP: two CPU processes (gloo), validation means are global sample means.

The test runs this file as a script in a subprocess (``python tests/test_ddp.py OUT``), which
trains with ``strategy="ddp_spawn"`` on two CPU processes and writes what each rank saw to
``OUT``; the test then recomputes the validation means by hand on one process. The subprocess
gives a hard time limit: a hung collective cannot hang pytest.

The validation split is uneven on purpose: rank 0 evaluates 25 samples in batches of 7, rank 1
evaluates 13 samples in batches of 4. Averaging batch means, or averaging the two ranks' means,
then gives numbers that differ from the mean over the 38 samples, which is what
``val/loss`` and ``val/loss/<term>`` should be.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _distributed import leave_process_group
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.balancing import GradNorm

WORLD_SIZE = 2
EPOCHS = 2
SPREAD_WEIGHT = 0.25
# Rank r evaluates samples VAL_SPLITS[r] in batches of VAL_BATCH_SIZES[r]: 7+7+7+4 and 4+4+4+1.
# Both ranks run the same number of batches, as DDP evaluation normally does.
VAL_SPLITS = ((0, 25), (25, 38))
VAL_BATCH_SIZES = (7, 4)
N_TRAIN = 32
TRAIN_BATCH_SIZE = 8
TIMEOUT_S = 150


def make_data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + VAL_SPLITS[-1][1], 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(len(x), generator=generator)
    # Later samples are harder: the two ranks' means differ, so averaging them is visibly wrong.
    y[N_TRAIN:] += torch.linspace(0.0, 4.0, len(x) - N_TRAIN)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


class _RankSlice(Sampler[int]):
    """The contiguous indices ``range(start, stop)``: an uneven split between ranks."""

    def __init__(self, start: int, stop: int) -> None:
        self.indices = range(start, stop)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TinyRegressor(LossMixModule):
    def __init__(self) -> None:
        super().__init__([LossTerm("fit"), LossTerm("spread", weight=SPREAD_WEIGHT, mode="max")])
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.train_set, self.val_set = make_data()

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        prediction = self.net(x).squeeze(-1)
        return {
            "fit": nn.functional.mse_loss(prediction, y),
            "spread": torch.tanh(prediction).pow(2).mean(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(
            self.train_set, num_replicas=self.trainer.world_size, rank=self.global_rank, seed=0
        )
        return DataLoader(self.train_set, TRAIN_BATCH_SIZE, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        start, stop = VAL_SPLITS[self.global_rank]
        batch_size = VAL_BATCH_SIZES[self.global_rank]
        return DataLoader(self.val_set, batch_size, sampler=_RankSlice(start, stop))


class _Recorder(pl.Callback):
    """Keeps, per validation epoch, the weights it ran with and the `val/` metrics it produced."""

    def __init__(self) -> None:
        self.weights: list[dict[str, Tensor]] = []
        self.metrics: list[dict[str, float]] = []
        self.val_batch_sizes: list[list[int]] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            self.val_batch_sizes.append([])

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any
    ) -> None:
        if not trainer.sanity_checking:
            self.val_batch_sizes[-1].append(len(batch[0]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.metrics.append(
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Written from inside each spawned process: ddp_spawn only sends rank 0's results back.
        out = Path(os.environ["LOSSMIX_DDP_OUT"])
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "weights": self.weights,
            "metrics": self.metrics,
            "val_batch_sizes": self.val_batch_sizes,
            "final": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
        }
        path = out / f"rank{trainer.global_rank}.pt"
        torch.save(record, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        leave_process_group()


def run_ddp(out: Path) -> None:
    """Train `TinyRegressor` on two CPU processes; each rank writes ``out/rank<r>.pt``."""
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    os.environ["LOSSMIX_DDP_OUT"] = str(out)
    pl.seed_everything(0)
    model = TinyRegressor()
    torch.save(model.state_dict(), out / "initial.pt")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        # A collective that waits longer than this raises instead of hanging.
        strategy=DDPStrategy(
            start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60)
        ),
        max_epochs=EPOCHS,
        use_distributed_sampler=False,  # the model's dataloaders split the data themselves
        num_sanity_val_steps=2,  # must not leak into the first epoch's means
        logger=TensorBoardLogger(out, name="", version="tb"),
        callbacks=[_Recorder()],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)


def reference_means(weights: Mapping[str, Tensor]) -> dict[str, float]:
    """The validation means over all 38 samples, computed on one process without the package."""
    model = TinyRegressor()
    model.load_state_dict(weights)
    x, y = model.val_set.tensors
    with torch.no_grad():
        prediction = model.net(x).squeeze(-1)
    fit = (prediction - y).pow(2)
    spread = torch.tanh(prediction).pow(2)
    return {
        "val/loss": float((fit - SPREAD_WEIGHT * spread).mean()),
        "val/loss/fit": float(fit.mean()),
        "val/loss/spread": float(spread.mean()),
        # The two wrong answers the uneven split is there to tell apart from the right one.
        "naive/mean_of_rank_means": float(
            torch.stack([fit[start:stop].mean() for start, stop in VAL_SPLITS]).mean()
        ),
        "naive/mean_of_batch_means": float(
            torch.cat(
                [
                    torch.stack([chunk.mean() for chunk in fit[start:stop].split(size)])
                    for (start, stop), size in zip(VAL_SPLITS, VAL_BATCH_SIZES, strict=True)
                ]
            ).mean()
        ),
    }


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, str(Path(__file__).resolve()), str(out)]
    # A session of its own, so that on timeout the spawned ranks are killed with the launcher.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"The DDP run took over {TIMEOUT_S} s:\n{log.decode()[-5000:]}")
    assert process.returncode == 0, f"The DDP run failed:\n{log.decode()[-5000:]}"
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return {"out": out, "ranks": ranks, "initial": torch.load(out / "initial.pt")}


@pytest.mark.slow
def test_ranks_saw_different_uneven_batches(ddp_run: dict[str, Any]) -> None:
    ranks = ddp_run["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == WORLD_SIZE for r in ranks)
    for r in ranks:
        assert r["val_batch_sizes"] == [[7, 7, 7, 4] if r["rank"] == 0 else [4, 4, 4, 1]] * EPOCHS
        # 16 training samples per rank (DistributedSampler), batches of 8: 2 steps per epoch.
        assert r["global_step"] == EPOCHS * N_TRAIN // WORLD_SIZE // TRAIN_BATCH_SIZE


@pytest.mark.slow
def test_validation_means_are_global_sample_means(ddp_run: dict[str, Any]) -> None:
    ranks = ddp_run["ranks"]
    assert len(ranks[0]["weights"]) == len(ranks[0]["metrics"]) == EPOCHS
    for epoch in range(EPOCHS):
        # The weights each rank validated with are the same, so one reference serves both.
        for name, value in ranks[0]["weights"][epoch].items():
            assert torch.equal(value, ranks[1]["weights"][epoch][name]), name
        expected = reference_means(ranks[0]["weights"][epoch])
        # The uneven split makes the naive reductions wrong by far more than the tolerance.
        for naive in ("naive/mean_of_rank_means", "naive/mean_of_batch_means"):
            assert abs(expected[naive] - expected["val/loss/fit"]) > 1e-2, naive
        for r in ranks:
            logged = r["metrics"][epoch]
            assert set(logged) == {"val/loss", "val/loss/fit", "val/loss/spread"}
            for key, value in logged.items():
                assert value == pytest.approx(expected[key], rel=1e-5), (r["rank"], epoch, key)


@pytest.mark.slow
def test_tensorboard_holds_the_global_means(ddp_run: dict[str, Any]) -> None:
    from _tensorboard import read_scalars

    scalars = read_scalars(ddp_run["out"] / "tb")
    expected = [reference_means(w) for w in ddp_run["ranks"][0]["weights"]]
    for key in ("val/loss", "val/loss/fit", "val/loss/spread"):
        assert [value for _, value in scalars[key]] == pytest.approx(
            [e[key] for e in expected], rel=1e-5
        ), key
    assert {"train/loss", "train/loss/fit", "train/weight/spread"} <= set(scalars)
    assert scalars["train/weight/spread"][-1][1] == -SPREAD_WEIGHT


@pytest.mark.slow
def test_parameters_are_identical_across_ranks(ddp_run: dict[str, Any]) -> None:
    final = [r["final"] for r in ddp_run["ranks"]]
    assert final[0].keys() == final[1].keys() == ddp_run["initial"].keys()
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
    # ...and they trained: equal because gradients were all-reduced, not because nothing moved.
    assert not all(torch.equal(final[0][n], ddp_run["initial"][n]) for n in final[0])


# -- nonfinite="skip" under DDP with automatic optimization (issue 7, item 1) -------------------

SKIP_BATCHES, SKIP_BATCH_SIZE = 8, 4
# (accumulation, NaN terms at (rank, batch), NaN gradients of a finite term at (rank, batch),
# optimizer steps skipped): one rank, both ranks, a gradient on one rank; then micro-batches.
SKIP_SCENARIOS = {
    "plain": (1, {(0, 1), (0, 3), (1, 3)}, {(1, 4)}, {1, 3, 4}),
    "accumulated": (2, {(1, 2), (0, 5)}, set(), {1, 2}),
}
#: With a GradNorm balancer, which decides at the first micro-batch of a step: a NaN in the
#: second micro-batch of step 1, on rank 1 only, drops the step after the decision.
BALANCED_SCENARIO = {"balanced": (2, {(1, 3)}, set(), {1})}


def skip_data(rank: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(SKIP_BATCHES * SKIP_BATCH_SIZE, 4, generator=generator)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))


class SkippingRegressor(LossMixModule):
    """Adam on a linear model; `fit` is NaN, or `size` has a NaN gradient, at given batches."""

    def __init__(self, scenario: str) -> None:
        balancer = GradNorm(on="net.weight") if scenario in BALANCED_SCENARIO else None
        super().__init__(
            [LossTerm("fit"), LossTerm("size", weight=0.01)], nonfinite="skip", balancer=balancer
        )
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.scenario = scenario

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        return skip_losses(self.net, batch, (self.global_rank, batch_idx), self.scenario)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(skip_data(self.global_rank), SKIP_BATCH_SIZE)

    def on_fit_end(self) -> None:
        out = Path(os.environ["LOSSMIX_DDP_OUT"])
        record = {
            "state": {
                k: v.detach().clone() if isinstance(v, Tensor) else v
                for k, v in self.state_dict().items()
            },
            "optimizer": self.trainer.optimizers[0].state_dict(),
            "skipped_steps": self.skipped_steps,
            "global_step": self.global_step,
            "warned": sorted(self.nonfinite_policy.warned),
        }
        torch.save(record, out / f"{self.scenario}_rank{self.global_rank}.pt")
        leave_process_group()


def skip_losses(
    net: nn.Module, batch: tuple[Tensor, Tensor], where: tuple[int, int], scenario: str
) -> dict[str, Tensor]:
    x, y = batch
    losses = {
        "fit": nn.functional.mse_loss(net(x).squeeze(-1), y),
        "size": net.weight.pow(2).sum(),
    }
    _, bad_terms, bad_gradients, _ = {**SKIP_SCENARIOS, **BALANCED_SCENARIO}[scenario]
    if where in bad_terms:
        losses["fit"] = losses["fit"] * math.nan
    if where in bad_gradients:
        losses["size"] = torch.sqrt(net.weight.sum() * 0.0)  # 0, with a NaN gradient
    return losses


def run_skip(out: Path) -> None:
    """Fit `SkippingRegressor` in every scenario on two CPU processes."""
    torch.set_num_threads(1)
    os.environ["LOSSMIX_DDP_OUT"] = str(out)
    for scenario, (accumulation, *_) in {**SKIP_SCENARIOS, **BALANCED_SCENARIO}.items():
        pl.Trainer(
            accelerator="cpu",
            devices=WORLD_SIZE,
            strategy=DDPStrategy(
                start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60)
            ),
            max_epochs=1,
            accumulate_grad_batches=accumulation,
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(SkippingRegressor(scenario))


def skip_reference(scenario: str) -> tuple[nn.Module, torch.optim.Adam]:
    """The same fit on one process, by hand, in which the skipped steps never happened."""
    accumulation, _, _, skipped = SKIP_SCENARIOS[scenario]
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    batches = [list(DataLoader(skip_data(rank), SKIP_BATCH_SIZE)) for rank in range(WORLD_SIZE)]
    for step in range(SKIP_BATCHES // accumulation):
        if step in skipped:
            continue
        optimizer.zero_grad()
        for rank in range(WORLD_SIZE):
            for index in range(step * accumulation, (step + 1) * accumulation):
                losses = skip_losses(net, batches[rank][index], (rank, index), scenario)
                total = losses["fit"] + 0.01 * losses["size"]
                (total / accumulation / WORLD_SIZE).backward()  # DDP averages the ranks
        optimizer.step()
    return net, optimizer


@pytest.mark.slow
def test_nonfinite_skip_under_ddp_equals_a_run_without_the_skipped_steps(
    tmp_path: Path,
) -> None:
    command = [sys.executable, str(Path(__file__).resolve()), "skip", str(tmp_path)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"The DDP run took over {TIMEOUT_S} s:\n{log.decode()[-5000:]}")
    assert process.returncode == 0, f"The DDP run failed:\n{log.decode()[-5000:]}"
    for scenario, (accumulation, _, _, skipped) in SKIP_SCENARIOS.items():
        ranks = [torch.load(tmp_path / f"{scenario}_rank{r}.pt") for r in range(WORLD_SIZE)]
        net, optimizer = skip_reference(scenario)
        steps = SKIP_BATCHES // accumulation
        for rank in ranks:
            assert rank["skipped_steps"] == len(skipped), scenario
            assert rank["global_step"] == steps, scenario
            for name, value in net.state_dict().items():
                torch.testing.assert_close(
                    rank["state"][f"net.{name}"], value, rtol=1e-5, atol=1e-7
                )
            state = rank["optimizer"]["state"]
            for index, parameter in enumerate(net.parameters()):
                reference = optimizer.state[parameter]
                assert int(state[index]["step"]) == int(reference["step"]) == steps - len(skipped)
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(
                        state[index][key], reference[key], rtol=1e-5, atol=1e-9
                    )
        # The ranks stay identical, bit for bit.
        for name, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][name]), (scenario, name)
        for index, state in ranks[0]["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, ranks[1]["optimizer"]["state"][index][key]), key
    # The balancer's decision of the dropped step is taken back on both ranks alike: GradNorm's
    # own Adam counts the 3 steps that happened (4 before the fix), and the ranks stay identical.
    ranks = [torch.load(tmp_path / f"balanced_rank{r}.pt") for r in range(WORLD_SIZE)]
    # The NaN was on rank 1 alone; rank zero, which warns, names it (before the fix: silence).
    assert ranks[0]["warned"] == ["fit"]
    assert "Loss term 'fit' is NaN or infinite on another process at step 1" in log.decode()
    for rank in ranks:
        assert rank["skipped_steps"] == 1
        extra = rank["state"]["loss_mix.balancer.adam._extra_state"]
        assert extra == {"steps": SKIP_BATCHES // 2 - 1}
    for name, value in ranks[0]["state"].items():
        if isinstance(value, Tensor):
            assert torch.equal(value, ranks[1]["state"][name]), name


if __name__ == "__main__":
    if sys.argv[1] == "skip":
        run_skip(Path(sys.argv[2]))
    else:
        run_ddp(Path(sys.argv[1]))
