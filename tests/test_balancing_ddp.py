"""Balancers under DDP (two gloo processes) equal one process fed the whole batch.

The test runs this file as a script in a subprocess (``python tests/test_balancing_ddp.py OUT``),
which fits `Balanced` with ``strategy="ddp_spawn"`` on two CPU processes, each rank reading its
own half of every batch, with gradient accumulation over two micro-batches; each rank writes its
final state to ``OUT``. The test then runs the same steps on one process with each whole batch
(both halves), by hand. Every balancer must decide from global quantities (the norm of the
averaged gradient, the averaged losses, the same random draw) for the two to agree; the ranks'
own gradients differ, so per-process decisions would not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from _distributed import leave_process_group
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMix, LossMixError, LossTerm
from lightning_lossmix.balancing import (
    DWA,
    FAMO,
    Balancer,
    GradientBalance,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)

WORLD_SIZE, BATCHES, HALF_BATCH, ACCUMULATION = 2, 8, 4, 2
TERMS = [LossTerm("a"), LossTerm("b"), LossTerm("c")]
DECLARED = {"a": 1.0, "b": 0.5, "c": 2.0}
TIMEOUT_S = 150
MAKERS: dict[str, Callable[[], Balancer]] = {
    "gradient_balance": lambda: GradientBalance(smoothing=0.5),
    "uncertainty": UncertaintyWeighting,
    "gradnorm": lambda: GradNorm(lr=0.05),
    "dwa": lambda: DWA(every_n_steps=1),
    "famo": FAMO,
    "random": lambda: RandomLossWeighting(seed=1),
}


def data(rank: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(rank)  # the ranks see different samples
    x = torch.randn(BATCHES * HALF_BATCH, 4, generator=generator) * (1 + rank)
    return TensorDataset(x, torch.stack([x.sum(1), x[:, 0] * x[:, 1]], dim=1))


class Task(nn.Module):
    """A trunk and three heads: three positive terms sharing the trunk's last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.Linear(8, 3)

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = self.heads(torch.tanh(self.trunk(x)))
        return {
            "a": (out[:, 0] - y[:, 0]).pow(2).mean(),
            "b": 10 * (out[:, 1] - y[:, 1]).pow(2).mean(),
            "c": (out[:, 2] - 1).pow(2).mean() + 0.1,
        }


def step_total(task: Task, balancer: Balancer, x: Tensor, y: Tensor, step: int) -> Tensor:
    values = task.losses(x, y)
    factors = balancer.factors(values, DECLARED, step=step)
    total = sum(DECLARED[n] * factors[n] * values[n] for n in values)
    regularizer = balancer.regularizer()
    return total + regularizer if regularizer is not None else total  # type: ignore[return-value]


def build() -> tuple[nn.ModuleDict, nn.ModuleDict]:
    torch.manual_seed(0)
    tasks = nn.ModuleDict({name: Task() for name in MAKERS})
    balancers = nn.ModuleDict({name: make() for name, make in MAKERS.items()})
    for name, balancer in balancers.items():
        assert isinstance(balancer, Balancer)
        balancer.bind(TERMS, tasks[name])
    return tasks, balancers


class Balanced(pl.LightningModule):
    """A plain LightningModule that trains one task per balancer, side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks, self.balancers = build()
        self.local_gradients: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        totals = []
        for name, task in self.tasks.items():
            balancer = self.balancers[name]
            totals.append(step_total(task, balancer, x, y, self.global_step))  # type: ignore[arg-type]
            if name == "gradient_balance" and balancer.gradients:
                self.local_gradients.append(balancer.gradients["a"][task.heads.weight].clone())  # type: ignore[index]
        return torch.stack(totals).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(self.global_rank), HALF_BATCH)

    def on_fit_end(self) -> None:
        record = {
            "state": {
                k: v.detach().clone() for k, v in self.state_dict().items() if torch.is_tensor(v)
            },
            "local_gradients": self.local_gradients,
            "global_step": self.global_step,
        }
        torch.save(record, Path(os.environ["LOSSMIX_DDP_OUT"]) / f"rank{self.global_rank}.pt")
        leave_process_group()


def run_ddp(out: Path) -> None:
    torch.set_num_threads(1)
    os.environ["LOSSMIX_DDP_OUT"] = str(out)
    pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=DDPStrategy(
            start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60)
        ),
        max_epochs=1,
        accumulate_grad_batches=ACCUMULATION,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(Balanced())


def one_process_reference() -> dict[str, Tensor]:
    """The same fit by hand on one process, each micro-batch being both ranks' halves."""
    module = nn.Module()
    module.tasks, module.balancers = build()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    halves = [list(DataLoader(data(rank), HALF_BATCH)) for rank in range(WORLD_SIZE)]
    for step in range(BATCHES // ACCUMULATION):
        optimizer.zero_grad()
        for index in range(step * ACCUMULATION, (step + 1) * ACCUMULATION):
            x = torch.cat([halves[rank][index][0] for rank in range(WORLD_SIZE)])
            y = torch.cat([halves[rank][index][1] for rank in range(WORLD_SIZE)])
            total = torch.stack(
                [
                    step_total(task, module.balancers[name], x, y, step)  # type: ignore[arg-type]
                    for name, task in module.tasks.items()
                ]
            ).sum()
            (total / ACCUMULATION).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.slow
def test_every_balancer_under_ddp_equals_one_process_with_the_whole_batch(
    tmp_path: Path,
) -> None:
    command = [sys.executable, str(Path(__file__).resolve()), str(tmp_path)]
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
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert ranks[0]["global_step"] == BATCHES // ACCUMULATION
    # The ranks' own gradients differ: deciding per process would give different weights.
    assert not torch.allclose(ranks[0]["local_gradients"][0], ranks[1]["local_gradients"][0])
    expected = one_process_reference()
    for name, value in expected.items():
        if name.endswith("_extra_state"):
            continue
        for rank in ranks:
            torch.testing.assert_close(rank["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name in MAKERS:  # the balancers moved away from their initial multipliers
        last = expected[f"balancers.{name}.last_multipliers"]
        assert not torch.allclose(last, torch.ones(3)), name


# -- the verdict on a step that does not count is the same on every process ------------------

VERDICT_MAKERS: dict[str, Callable[[], Balancer]] = {
    "gradient_balance": lambda: GradientBalance(on="weight", smoothing=0.5),
    "gradnorm": lambda: GradNorm(on="weight", lr=0.1),
    "famo": FAMO,
    "dwa": lambda: DWA(every_n_steps=1),
    "random": lambda: RandomLossWeighting(seed=1),
}
#: What goes wrong on rank 1 only: a NaN term, or a finite term whose gradient is NaN.
FAULTS = {"value": list(VERDICT_MAKERS), "gradient": ["gradient_balance", "gradnorm"]}


def verdict_values(net: nn.Module, rank: int, step: int, fault: str | None) -> dict[str, Tensor]:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(10 * step + rank))
    y = net(x).squeeze(-1)
    a = y.pow(2).mean() + 0.1
    if fault == "value":
        a = a * float("nan")
    elif fault == "gradient":
        a = a + (y - y.detach()).pow(2).sum().sqrt()  # adds 0, with a NaN gradient (sqrt at 0)
    return {"a": a, "b": (y - 1).pow(2).mean() + 0.1}


def state_of(balancer: Balancer) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in balancer.state_dict().items()}


def verdict_rank(rank: int, out: Path) -> None:
    """One process: two good steps, a step bad on rank 1 only, a good step; record the states."""
    dist.init_process_group(
        "gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=WORLD_SIZE
    )
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    record = {}
    for fault, names in FAULTS.items():
        for name in names:
            balancer = VERDICT_MAKERS[name]()
            balancer.bind(TERMS[:2], net)
            for step in (0, 1):
                balancer.factors(verdict_values(net, rank, step, None), DECLARED, step=step)
            before = state_of(balancer)
            bad = fault if rank == 1 else None
            balancer.factors(verdict_values(net, rank, 2, bad), DECLARED, step=2)
            after = state_of(balancer)
            last = balancer.factors(verdict_values(net, rank, 3, None), DECLARED, step=3)
            record[f"{fault}/{name}"] = {
                "before": before,
                "after": after,
                "last": torch.stack(list(last.values())).detach(),
            }
    # A LossMix that checks finiteness raises on every process, not only where a term is NaN
    # (a process going on alone would wait in the backward's all-reduce).
    for fault, names in FAULTS.items():
        for name in names:
            mix = LossMix(TERMS[:2], balancer=VERDICT_MAKERS[name]()).bind(net)
            mix(verdict_values(net, rank, 0, None), step=0)
            try:
                mix(verdict_values(net, rank, 1, fault if rank == 1 else None), step=1)
                record[f"raised/{fault}/{name}"] = ""
            except LossMixError as error:
                record[f"raised/{fault}/{name}"] = str(error)
    torch.save(record, out / f"verdict{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_step_bad_on_one_process_leaves_every_process_untouched(tmp_path: Path) -> None:
    command = [sys.executable, str(Path(__file__).resolve()), "verdict", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-5000:]
    ranks = [torch.load(tmp_path / f"verdict{r}.pt") for r in range(WORLD_SIZE)]
    cases = {f"{f}/{n}" for f, names in FAULTS.items() for n in names}
    assert set(ranks[0]) == cases | {f"raised/{case}" for case in cases}
    for case in cases:
        assert "measurement at step 1 is not finite" in ranks[0][f"raised/{case}"], case
        assert ranks[1][f"raised/{case}"], case  # its own term, or the measurement
    for case in cases:
        for rank in ranks:  # before the fix, NaN gradients reached the state on both ranks
            before, after = rank[case]["before"], rank[case]["after"]
            for key, value in before.items():
                if isinstance(value, Tensor):
                    torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=case + key)
                else:
                    assert after[key] == value, case + key
        torch.testing.assert_close(ranks[0][case]["last"], ranks[1][case]["last"], msg=case)
        assert bool(torch.isfinite(ranks[0][case]["last"]).all()), case


if __name__ == "__main__":
    if sys.argv[1] == "verdict":
        torch.multiprocessing.spawn(verdict_rank, args=(Path(sys.argv[2]),), nprocs=WORLD_SIZE)
    else:
        run_ddp(Path(sys.argv[1]))
