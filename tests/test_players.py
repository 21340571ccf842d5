"""Players: alternating updates done by the base class, against a hand-written loop."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixError, LossMixModule, LossTerm, Player
from lightning_lossmix._players_loop import PlayersLoop
from lightning_lossmix.callbacks import GradientMonitor
from lightning_lossmix.schedules import Linear

sys.path.insert(0, str(Path(__file__).parent))
from _distributed import leave_process_group
from _tensorboard import read_scalars

TERMS = (
    LossTerm("real"),
    LossTerm("fake"),
    LossTerm("fool", weight=Linear(0.0, 1.0, steps=4)),
)
PLAYERS = (Player("discriminator", ["real", "fake"]), Player("generator", ["fool"]))


def networks() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)), nn.Linear(3, 2)


def game_losses(
    discriminator: nn.Module, generator: nn.Module, x: Tensor, z: Tensor, player: str
) -> dict[str, Tensor]:
    if player == "discriminator":
        fake = generator(z).detach()
        real_logits, fake_logits = discriminator(x), discriminator(fake)
        return {
            "real": F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)),
            "fake": F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)),
        }
    logits = discriminator(generator(z))
    return {"fool": F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))}


class TinyGAN(LossMixModule):
    def __init__(self, players: tuple[Player, ...] = PLAYERS, optimizers: int = 2) -> None:
        super().__init__(TERMS, players=players)
        self.discriminator, self.generator = networks()
        self.n_optimizers = optimizers

    def compute_losses(
        self, batch: Any, batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        x, z = batch
        assert player is not None
        return game_losses(self.discriminator, self.generator, x, z, player)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.discriminator.parameters(), lr=0.1),
            torch.optim.SGD(self.generator.parameters(), lr=0.1),
        ][: self.n_optimizers]


def data(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    return DataLoader(
        TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 3, generator=g)), 8
    )


def quiet_trainer(logdir: Path | None = None, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        logger=TensorBoardLogger(logdir, name="", version="") if logdir else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=1,
        **kwargs,
    )


def test_players_take_turns_exactly_like_a_hand_written_loop(tmp_path: Path) -> None:
    model = TinyGAN()
    quiet_trainer(tmp_path, max_epochs=1).fit(model, data())

    discriminator, generator = networks()
    d_opt = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    g_opt = torch.optim.SGD(generator.parameters(), lr=0.1)
    for step, (x, z) in enumerate(data()):
        d = game_losses(discriminator, generator, x, z, "discriminator")
        d_opt.zero_grad()
        (d["real"] + d["fake"]).backward()
        d_opt.step()
        g = game_losses(discriminator, generator, x, z, "generator")
        g_opt.zero_grad()
        (min(step / 4, 1.0) * g["fool"]).backward()  # Linear(0, 1, 4), one step per batch
        g_opt.step()
    for mine, reference in zip(
        [*model.discriminator.parameters(), *model.generator.parameters()],
        [*discriminator.parameters(), *generator.parameters()],
        strict=True,
    ):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-7)

    scalars = read_scalars(tmp_path)
    # One schedule step per batch; Lightning's global_step counts both optimizers.
    assert [v for _, v in scalars["train/weight/fool"]] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert [s for s, _ in scalars["train/weight/fool"]] == [0, 1, 2, 3]
    assert model.global_step == 8
    assert {"train/discriminator/loss", "train/generator/loss", "train/loss/real"} <= set(scalars)


def test_gradient_monitor_measures_each_player() -> None:
    model = TinyGAN()
    monitor = GradientMonitor(every_n_steps=1)
    # max_steps counts both optimizers: 4 is 2 batches, and `fool` weighs 0.25 at the second.
    quiet_trainer(max_steps=4, callbacks=[monitor]).fit(model, data())
    figures = monitor.last_metrics
    # The discriminator's terms on its own parameters; the generator's on its own.
    assert figures["grad_magnitude/discriminator/real"] > 0
    assert figures["grad_magnitude/generator/fool"] > 0
    assert "grad_magnitude/generator/real" not in figures  # frozen during that turn
    assert "grad_magnitude/discriminator/fool" not in figures
    assert figures["grad_share/discriminator/real"] + figures[
        "grad_share/discriminator/fake"
    ] == pytest.approx(1.0)


def test_histograms_cover_the_parameters_of_the_player_measured(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = GradientMonitor(every_n_steps=1, log_histograms=True, summary=False)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[monitor]).fit(TinyGAN(), data())
    [events] = tmp_path.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"histograms": 0})
    accumulator.Reload()
    counts = {
        tag: accumulator.Histograms(tag)[-1].histogram_value.num
        for tag in accumulator.Tags()["histograms"]
    }
    # The generator (a 3-to-2 linear layer: 8 values) in its turn, not the frozen discriminator.
    assert counts["grad_histogram/all/fool"] == 8
    assert counts["grad_histogram/all/real"] == 2 * 8 + 8 + 9 * 1  # the discriminator's 33
    assert "grad_histogram/discriminator/fool" not in counts  # frozen then: no spike at 0


def test_the_layout_charts_what_every_player_logs(tmp_path: Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    class GeneratorFirst(TinyGAN):  # one term plays first: no share or cosine in its turn
        def __init__(self) -> None:
            LossMixModule.__init__(self, TERMS, players=PLAYERS[::-1])
            self.discriminator, self.generator = networks()
            self.n_optimizers = 2

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return super().configure_optimizers()[::-1]

    monitor = GradientMonitor(every_n_steps=1, summary=False)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[monitor]).fit(GeneratorFirst(), data())
    [events] = tmp_path.glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    layouts = [
        e.summary.value[0].tensor.string_val[0]
        for e in EventFileLoader(str(events)).Load()
        if e.summary.value and e.summary.value[0].tag == "custom_scalars__config__"
    ]
    last = layout_pb2.Layout.FromString(layouts[-1])  # what TensorBoard shows
    charts = {chart.title for category in last.category for chart in category.chart}
    logged = {tag.rpartition("/")[0] for tag in read_scalars(tmp_path) if tag.count("/") == 2}
    kinds = {t for t in logged if t.startswith(("grad_magnitude", "grad_share", "grad_cosine"))}
    assert kinds <= charts  # every kind a player logs has its chart
    assert {"grad_share/all", "grad_cosine/discriminator"} <= charts
    assert "grad_share/generator" not in charts  # one term there: it would stay empty


@pytest.mark.parametrize(
    ("players", "match"),
    [
        ((Player("d", ["real", "fake"]), Player("g", ["fake", "fool"])), "claimed by two players"),
        ((Player("d", ["real", "fake"]), Player("g", ["fol"])), "'fol', which is not declared"),
        ((Player("d", ["real", "fake"]),), r"\['fool'\] belong to no player"),
        ((Player("d", ["real", "fake"]), Player("d", ["fool"])), "player names should be unique"),
    ],
)
def test_bad_players_name_the_culprit(players: tuple[Player, ...], match: str) -> None:
    with pytest.raises(LossMixError, match=match):
        TinyGAN(players)


def test_player_without_terms_or_with_a_reserved_name() -> None:
    with pytest.raises(LossMixError, match="Player 'critic' has no terms"):
        Player("critic", [])
    with pytest.raises(LossMixError, match="the name is taken by the logs"):
        Player("loss", ["real"])


def test_players_without_matching_optimizers() -> None:
    with pytest.raises(LossMixError, match=r"declares 2 players .* returned 1 optimizer"):
        quiet_trainer(max_steps=1).fit(TinyGAN(optimizers=1), data())


class MisconfiguredGAN(TinyGAN):
    """A game whose optimizers or returned terms do not match its players."""

    def __init__(self, optimizers: str = "own", extra_term: bool = False) -> None:
        super().__init__()
        self.which, self.extra_term = optimizers, extra_term

    def compute_losses(
        self, batch: Any, batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        losses = dict(super().compute_losses(batch, batch_idx, player))
        if self.extra_term and player == "discriminator":  # the generator's term as well
            losses |= super().compute_losses(batch, batch_idx, "generator")
        return losses

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        d, g = self.discriminator.parameters, self.generator.parameters
        if self.which == "shared":
            return [torch.optim.SGD(self.parameters(), lr=0.1) for _ in range(2)]
        if self.which == "swapped":
            return [torch.optim.SGD(g(), lr=0.1), torch.optim.SGD(d(), lr=0.1)]
        return [torch.optim.SGD(d(), lr=0.1), torch.optim.SGD(g(), lr=0.1)]


def test_players_optimizers_sharing_parameters_are_refused() -> None:
    model = MisconfiguredGAN("shared")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LossMixError) as info:
        quiet_trainer(max_steps=1).fit(model, data())
    message = str(info.value)
    assert "'discriminator' and 'generator' both hold" in message
    first = ["discriminator.0.weight", "discriminator.0.bias", "discriminator.2.weight"]
    assert f"the parameters {first} " in message
    assert "(6 in all)" in message and "self.generator.parameters()" in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_optimizers_are_checked_once_per_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[int] = []
    original = PlayersLoop.check_optimizers

    def counted(loop: PlayersLoop, module: Any) -> None:
        checks.append(module.trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        original(loop, module)

    monkeypatch.setattr(PlayersLoop, "check_optimizers", counted)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(TinyGAN(), data())
    assert checks == [1]  # at the first batch only, not at each epoch's batch 0
    trainer.fit_loop.max_epochs = 3
    trainer.fit(TinyGAN(), data())
    assert len(checks) == 2  # and again in the next fit


def test_optimizers_in_another_order_than_the_players_are_named() -> None:
    with pytest.raises(LossMixError) as info:
        quiet_trainer(max_steps=1).fit(MisconfiguredGAN("swapped"), data())
    message = str(info.value)
    assert "terms ['real', 'fake'] of player 'discriminator' reach none" in message
    assert "optimizer 0, which holds parameters of ['generator']" in message
    assert "players' order ['discriminator', 'generator']" in message


def test_a_term_of_another_player_names_its_player() -> None:
    with pytest.raises(LossMixError) as info:
        quiet_trainer(max_steps=1).fit(MisconfiguredGAN(extra_term=True), data())
    message = str(info.value)
    assert "player='discriminator') returned 'fool', a term of player 'generator'" in message
    assert "return that player's terms only: ['real', 'fake']" in message


def test_validation_reports_every_players_terms() -> None:
    model = TinyGAN()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(model, data(), data())
    assert {"val/loss/real", "val/loss/fake", "val/loss/fool"} <= set(trainer.callback_metrics)


# -- DDP: parameters stay identical across ranks, with players and with opposed_by -------------


class OpposedRegressor(LossMixModule):
    def __init__(self) -> None:
        super().__init__([LossTerm("fit"), LossTerm("adversary", weight=0.5, opposed_by="body")])
        torch.manual_seed(0)
        self.body = nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)
        self.critic = nn.Linear(4, 1)

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        x, _ = batch
        h = torch.tanh(self.body(x))
        return {"fit": self.head(h).pow(2).mean(), "adversary": self.critic(h).pow(2).mean()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SaveParameters(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        values = [p.detach().flatten().tolist() for p in pl_module.parameters()]
        (Path(self.out) / f"{type(pl_module).__name__}{trainer.global_rank}.json").write_text(
            json.dumps(values)
        )
        lrs = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
        (Path(self.out) / f"{type(pl_module).__name__}{trainer.global_rank}.lr").write_text(
            json.dumps(lrs)
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        leave_process_group()  # a gloo group left alive at exit aborts once in a while


class PlateauOnLossGAN(TinyGAN):
    """The discriminator's learning rate follows a plateau of its own loss, every batch."""

    def __init__(self) -> None:
        LossMixModule.__init__(
            self, TERMS, players=PLAYERS, plateau_monitor="train/discriminator/loss"
        )
        self.discriminator, self.generator = networks()
        self.n_optimizers = 2

    def configure_optimizers(self) -> Any:
        d_opt, g_opt = super().configure_optimizers()
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(d_opt, patience=0, threshold=0.0)
        return [d_opt, g_opt], [{"scheduler": plateau, "interval": "step"}]


class PlateauOnLossRegressor(OpposedRegressor):
    """No players: Lightning steps a ReduceLROnPlateau on the module's `train/loss`."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, threshold=0.0)
        return [optimizer], [{"scheduler": plateau, "interval": "step", "monitor": "train/loss"}]


def spread_data() -> DataLoader:
    """Samples of growing scale: each process's losses move their own way."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 2, generator=g) * torch.linspace(0.2, 3, 64)[:, None]
    return DataLoader(TensorDataset(x, torch.randn(64, 3, generator=g)), 8)


def _ddp_main(out: str) -> None:
    # Each process sees its own batches: the plateau must read the loss averaged over them
    # (read on each process alone, the two learning rates parted within two epochs).
    for model in (PlateauOnLossGAN(), OpposedRegressor(), PlateauOnLossRegressor()):
        game = isinstance(model, (TinyGAN, PlateauOnLossRegressor))
        pl.Trainer(
            accelerator="cpu",
            devices=2,
            # Each player's backward leaves the other's parameters unused: DDP must know.
            strategy="ddp_spawn_find_unused_parameters_true" if game else "ddp_spawn",
            max_epochs=2 if game else 1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[_SaveParameters(out)],
        ).fit(model, spread_data() if game else data())


@pytest.mark.slow
def test_ddp_keeps_parameters_identical_across_ranks(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], check=False, timeout=240, capture_output=True
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-5000:]
    for name in ("PlateauOnLossGAN", "OpposedRegressor", "PlateauOnLossRegressor"):
        rank0 = json.loads((tmp_path / f"{name}0.json").read_text())
        rank1 = json.loads((tmp_path / f"{name}1.json").read_text())
        assert rank0 == rank1, name
        assert rank0 != [p.detach().flatten().tolist() for p in globals()[name]().parameters()]
        lrs = [json.loads((tmp_path / f"{name}{rank}.lr").read_text()) for rank in (0, 1)]
        assert lrs[0] == lrs[1], name
    # Before the fix (no players, a plateau on `train/loss`), each process read its own loss.
    assert min(json.loads((tmp_path / "PlateauOnLossRegressor0.lr").read_text())) < 0.1


if __name__ == "__main__":
    _ddp_main(sys.argv[1])


def test_opposed_by_inside_players_is_refused() -> None:
    terms = (LossTerm("real"), LossTerm("fake", opposed_by="generator"), LossTerm("fool"))

    class Opposed(TinyGAN):
        def __init__(self) -> None:
            LossMixModule.__init__(self, terms, players=PLAYERS)

    with pytest.raises(LossMixError) as info:
        Opposed()
    assert "['fake'] have `opposed_by`, which players do not support" in str(info.value)
    assert "part of the same player, place lightning_lossmix.nn.GradientReversal" in str(info.value)


def test_player_figures_equal_hand_written_autograd_grad() -> None:
    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, b: Any, i: int) -> None:
            self.state = {k: v.clone() for k, v in module.state_dict().items()}
            self.batch = b

    model, monitor, capture = TinyGAN(), GradientMonitor(every_n_steps=1), Capture()
    quiet_trainer(max_steps=2, callbacks=[capture, monitor]).fit(model, data())
    reference = TinyGAN()
    reference.load_state_dict(capture.state)
    x, z = capture.batch
    losses = game_losses(reference.discriminator, reference.generator, x, z, "discriminator")
    params = list(reference.discriminator.parameters())
    for name in ("real", "fake"):
        grads = torch.autograd.grad(losses[name], params, retain_graph=True)
        expected = torch.cat([g.flatten() for g in grads]).norm().item()
        assert monitor.last_metrics[f"grad_magnitude/discriminator/{name}"] == pytest.approx(
            expected, rel=1e-5
        )


# -- issue 7 item 14: schedulers, steps in errors, compute_losses' signature -------------------


def hand_written_game(
    every_n: int = 1, clip: tuple[float, str] | None = None, batches: int = 4
) -> tuple[nn.Module, nn.Module]:
    """The game of `TinyGAN` written out by hand: the generator steps every `every_n` batches."""
    discriminator, generator = networks()
    d_opt = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    g_opt = torch.optim.SGD(generator.parameters(), lr=0.1)

    def clipped(parameters: list[nn.Parameter]) -> None:
        if clip is not None and clip[1] == "norm":
            torch.nn.utils.clip_grad_norm_(parameters, clip[0])
        elif clip is not None:
            torch.nn.utils.clip_grad_value_(parameters, clip[0])

    for step, (x, z) in enumerate(data()):
        if step == batches:
            break
        d = game_losses(discriminator, generator, x, z, "discriminator")
        d_opt.zero_grad()
        (d["real"] + d["fake"]).backward()
        clipped(list(discriminator.parameters()))
        d_opt.step()
        if (step + 1) % every_n == 0:
            g = game_losses(discriminator, generator, x, z, "generator")
            g_opt.zero_grad()
            (min(step / 4, 1.0) * g["fool"]).backward()
            clipped(list(generator.parameters()))
            g_opt.step()
    return discriminator, generator


def assert_same_parameters(model: Any, reference: tuple[nn.Module, nn.Module]) -> None:
    mine = [*model.discriminator.parameters(), *model.generator.parameters()]
    theirs = [*reference[0].parameters(), *reference[1].parameters()]
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_compute_losses_without_player_is_refused_at_construction() -> None:
    class NoPlayer(TinyGAN):
        def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:  # type: ignore[override]
            return {}

    with pytest.raises(LossMixError) as info:
        NoPlayer()
    message = str(info.value)
    assert "NoPlayer.compute_losses takes no `player` argument" in message
    assert "def compute_losses(self, batch, batch_idx, player=None)" in message


def test_player_errors_name_the_logged_step() -> None:
    class NaNAtBatch2(TinyGAN):
        def compute_losses(
            self, batch: Any, batch_idx: int, player: str | None = None
        ) -> Mapping[str, Tensor]:
            losses = dict(super().compute_losses(batch, batch_idx, player))
            if player == "generator" and batch_idx == 2:
                losses["fool"] = losses["fool"] * math.nan
            return losses

    model = NaNAtBatch2()
    with pytest.raises(LossMixError, match="Loss term 'fool' is nan at step 2"):
        quiet_trainer(max_epochs=1).fit(model, data())
    assert model.global_step == 5  # Lightning's count: two optimizers, plus the discriminator's


def test_players_skip_a_step_whose_gradient_is_not_finite() -> None:
    class SqrtAtZero(TinyGAN):
        def __init__(self) -> None:
            LossMixModule.__init__(self, TERMS, players=PLAYERS, nonfinite="skip")
            self.discriminator, self.generator = networks()
            self.n_optimizers = 2

        def compute_losses(
            self, batch: Any, batch_idx: int, player: str | None = None
        ) -> Mapping[str, Tensor]:
            losses = dict(super().compute_losses(batch, batch_idx, player))
            if player == "generator" and batch_idx == 1:
                losses["fool"] = torch.sqrt(self.generator(batch[1]).sum() * 0.0)
            return losses

    model = SqrtAtZero()
    recorded: list[Tensor] = []

    class Generator(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
            recorded.append(module.generator.weight.detach().clone())

    with pytest.warns(UserWarning, match=r"gradient of parameter 'generator.weight' is nan"):
        quiet_trainer(max_epochs=1, callbacks=[Generator()]).fit(model, data())
    assert model.skipped_steps == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert torch.equal(recorded[0], recorded[1])  # batch 1: the generator's turn was skipped
    assert not torch.equal(recorded[1], recorded[2])  # batch 2 trains again


class PlateauGAN(TinyGAN):
    """The discriminator's learning rate follows a ReduceLROnPlateau on `monitor`."""

    def __init__(self, monitor: str | None) -> None:
        LossMixModule.__init__(self, TERMS, players=PLAYERS, plateau_monitor=monitor)
        self.discriminator, self.generator = networks()
        self.n_optimizers = 2

    def configure_optimizers(self) -> Any:
        d_opt = torch.optim.SGD(self.discriminator.parameters(), lr=0.1)
        g_opt = torch.optim.SGD(self.generator.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(d_opt, mode="max", patience=0)
        return [{"optimizer": d_opt, "lr_scheduler": plateau}, {"optimizer": g_opt}]


def test_players_step_reduce_lr_on_plateau_with_the_monitored_metric() -> None:
    seen: list[float] = []

    class Metric(pl.Callback):  # callbacks' epoch-end hooks run before the module's
        def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
            seen.append(float(trainer.callback_metrics["train/discriminator/loss"]))

    model = PlateauGAN("train/discriminator/loss")
    trainer = quiet_trainer(max_epochs=4, callbacks=[Metric()])
    trainer.fit(model, data())

    reference_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        reference_optimizer, mode="max", patience=0
    )
    for value in seen:
        reference.step(value)
    assert len(seen) == 4
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(reference_optimizer.param_groups[0]["lr"])
    assert lr < 0.1  # the discriminator's loss went down, so a "max" plateau reduced it


def test_a_step_plateau_reads_the_validation_that_follows_its_batch() -> None:
    class StepPlateauGAN(PlateauGAN):
        def configure_optimizers(self) -> Any:
            [d, g] = super().configure_optimizers()
            plateau = d["lr_scheduler"]
            return [d["optimizer"], g["optimizer"]], [
                {"scheduler": plateau, "interval": "step", "frequency": 2}
            ]

    seen: list[float] = []

    class Metric(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, module: Any) -> None:
            if not trainer.sanity_checking:
                seen.append(float(trainer.callback_metrics["val/loss"]))

    trainer = quiet_trainer(max_epochs=2, val_check_interval=2, callbacks=[Metric()])
    trainer.fit(StepPlateauGAN("val/loss"), data(), data())  # a validation every two batches
    reference_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        reference_optimizer, mode="max", patience=0
    )
    for value in seen:  # as automatic optimization: right after each validation
        reference.step(value)
    assert len(seen) == 4
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == reference.last_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]


def test_a_step_scheduler_s_frequency_counts_in_the_epoch_as_lightning_does() -> None:
    class FrequentGAN(TinyGAN):
        def configure_optimizers(self) -> Any:
            d_opt, g_opt = super().configure_optimizers()
            d_sched = torch.optim.lr_scheduler.StepLR(d_opt, step_size=1, gamma=0.5)
            return [d_opt, g_opt], [{"scheduler": d_sched, "interval": "step", "frequency": 2}]

    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(FrequentGAN(), data(40))  # five batches: batch_idx 1 and 3 of each epoch
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2 * 2  # not 10 // 2


def test_reduce_lr_on_plateau_without_a_metric_is_refused_at_the_first_batch() -> None:
    with pytest.raises(LossMixError, match="plateau_monitor='val/loss'"):
        quiet_trainer(max_epochs=1).fit(PlateauGAN(None), data())
    with pytest.raises(LossMixError, match=r"monitors 'val/los' .*Logged: \['train/"):
        quiet_trainer(max_epochs=1).fit(PlateauGAN("val/los"), data())


# -- issue 7 item 18: gradient clipping, players stepping less often, a shared forward -------


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_players_clip_gradients_as_the_trainer_asks(algorithm: str) -> None:
    model = TinyGAN()
    trainer = quiet_trainer(max_epochs=1, gradient_clip_val=0.01, gradient_clip_algorithm=algorithm)
    trainer.fit(model, data())
    assert_same_parameters(model, hand_written_game(clip=(0.01, algorithm)))
    # Not trivially: without clipping the parameters end elsewhere.
    unclipped = hand_written_game()
    assert not torch.allclose(model.generator.weight, unclipped[1].weight, atol=1e-4)
    assert trainer.gradient_clip_val == 0.01  # given back after the fit


def test_a_second_fit_on_the_same_trainer_clips_again_without_a_new_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clips: list[Any] = []

    class Clips(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
            clips.append(module._players_loop.clip)

    trainer = quiet_trainer(max_steps=2, gradient_clip_val=0.01, callbacks=[Clips()])
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer.fit(TinyGAN(), data())
        trainer.fit_loop.epoch_loop.max_steps = 4  # Lightning keeps counting across fits
        trainer.fit(TinyGAN(), data())
    assert clips == [(0.01, None)] * 2  # one batch in each fit, clipped
    assert trainer.gradient_clip_val == 0.01  # given back by the first fit's callback, reused
    assert "will override existing callbacks" not in caplog.text


def test_a_player_can_step_every_n_batches() -> None:
    players = (
        Player("discriminator", ["real", "fake"]),
        Player("generator", ["fool"], every_n_batches=2),
    )
    model = TinyGAN(players)
    quiet_trainer(max_epochs=1).fit(model, data())
    assert_same_parameters(model, hand_written_game(every_n=2))
    assert model.global_step == 4 + 2  # four discriminator steps, two generator steps


def test_step_schedulers_count_their_own_players_steps() -> None:
    class ScheduledGAN(TinyGAN):
        def configure_optimizers(self) -> Any:
            d_opt, g_opt = super().configure_optimizers()
            d_sched = torch.optim.lr_scheduler.StepLR(d_opt, step_size=1, gamma=0.5)
            g_sched = torch.optim.lr_scheduler.StepLR(g_opt, step_size=1, gamma=0.5)
            return [d_opt, g_opt], [
                {"scheduler": d_sched, "interval": "step", "frequency": 2},
                {"scheduler": g_sched, "interval": "step"},
            ]

    seen: list[tuple[int, int]] = []

    class Seen(pl.Callback):  # where ModelCheckpoint(every_n_train_steps=...) saves
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            seen.append(tuple(c.scheduler.last_epoch for c in trainer.lr_scheduler_configs))

    players = (
        Player("discriminator", ["real", "fake"]),
        Player("generator", ["fool"], every_n_batches=3),
    )
    trainer = quiet_trainer(max_epochs=1, callbacks=[Seen()])
    trainer.fit(ScheduledGAN(players), data(64))  # eight batches
    d_sched, g_sched = (config.scheduler for config in trainer.lr_scheduler_configs)
    # As automatic optimization counts: each scheduler follows its own optimizer's steps.
    assert d_sched.last_epoch == 8 // 2  # eight discriminator steps, every second one
    assert g_sched.last_epoch == 8 // 3  # two generator steps (batches 2 and 5)
    assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    # And as it does, before the callbacks' on_train_batch_end: a checkpoint saved there
    # holds the batch's step (it lagged one behind, and a resumed fit never took it).
    assert seen == [((b + 1) // 2, (b + 1) // 3) for b in range(8)]


def test_epoch_schedulers_step_before_the_epoch_s_validation_and_not_in_a_cut_epoch() -> None:
    class EpochGAN(TinyGAN):
        def configure_optimizers(self) -> Any:
            d_opt, g_opt = super().configure_optimizers()
            d_sched = torch.optim.lr_scheduler.StepLR(d_opt, step_size=1, gamma=0.5)
            return [d_opt, g_opt], [{"scheduler": d_sched, "interval": "epoch"}]

    seen: list[int] = []

    class Seen(pl.Callback):  # where ModelCheckpoint saves after a validation
        def on_validation_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if not trainer.sanity_checking:
                seen.append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)

    trainer = quiet_trainer(max_epochs=2, callbacks=[Seen()], limit_val_batches=1)
    trainer.fit(EpochGAN(), data(), data())
    assert seen == [1, 2]  # as automatic optimization: stepped at the epoch's last batch
    cut = quiet_trainer(max_steps=12)  # four batches of two steps, then two of the next epoch
    cut.fit(EpochGAN(), data())
    assert cut.lr_scheduler_configs[0].scheduler.last_epoch == 1


def test_validation_in_the_fit_and_from_its_checkpoint_use_the_same_weights(
    tmp_path: Path,
) -> None:
    # `fool` ramps in over four batches: the fit's validation, after its fourth batch, and
    # trainer.validate from the checkpoint saved then both weigh it at step 4 (1.0, not 0.75).
    saving = ModelCheckpoint(tmp_path, monitor="val/loss")
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[saving],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(TinyGAN(), data(), data())
    in_fit = trainer.callback_metrics
    parts = sum(float(in_fit[f"val/loss/{t}"]) for t in ("real", "fake", "fool"))
    assert float(in_fit["val/loss"]) == pytest.approx(parts, rel=1e-6)  # fool weighs 1.0
    [metrics] = quiet_trainer().validate(
        TinyGAN(), data(), ckpt_path=saving.best_model_path, verbose=False
    )
    assert metrics["val/loss"] == pytest.approx(float(in_fit["val/loss"]), rel=1e-6)


class ResumableLoader(DataLoader):
    """A loader without shuffling that Lightning can resume in the middle of an epoch."""

    def __init__(self, dataset: TensorDataset, batch_size: int) -> None:
        super().__init__(dataset, batch_size)
        self.served = self.skip = 0

    def __iter__(self) -> Any:
        skip, self.skip = self.skip, 0
        self.served = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self.served += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["served"]


def test_a_game_with_schedulers_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    class Adams(TinyGAN):
        def configure_optimizers(self) -> Any:
            d = torch.optim.Adam(self.discriminator.parameters(), lr=0.01)
            g = torch.optim.Adam(self.generator.parameters(), lr=0.01)
            return [d, g], [
                {"scheduler": torch.optim.lr_scheduler.StepLR(d, 1, 0.9), "interval": "step"},
                {"scheduler": torch.optim.lr_scheduler.StepLR(g, 1, 0.8), "interval": "step"},
            ]

    players = (
        Player("discriminator", ["real", "fake"]),
        Player("generator", ["fool"], every_n_batches=3),
    )

    def fit(max_steps: int, ckpt_path: Path | None = None) -> pl.Trainer:
        saving = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)
        trainer = pl.Trainer(
            max_steps=max_steps,
            callbacks=[saving],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        loader = ResumableLoader(data(64).dataset, 8)  # type: ignore[arg-type]
        trainer.fit(Adams(players), loader, ckpt_path=ckpt_path)
        return trainer

    straight = fit(max_steps=13)  # eight batches, then two of the next epoch
    for old in tmp_path.glob("*.ckpt"):
        old.unlink()
    fit(max_steps=6)  # batch 4 ends at step 6: the generator played at batch 2
    [middle] = [p for p in tmp_path.glob("*.ckpt") if "step=6" in p.name]
    resumed = fit(max_steps=13, ckpt_path=middle)
    for a, b in zip(
        straight.lightning_module.parameters(), resumed.lightning_module.parameters(), strict=True
    ):
        assert torch.equal(a, b)
    for mine, theirs in zip(straight.optimizers, resumed.optimizers, strict=True):
        assert mine.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]


def test_a_player_that_sits_out_a_batch_logs_nothing_at_it(tmp_path: Path) -> None:
    players = (
        Player("discriminator", ["real", "fake"]),
        Player("generator", ["fool"], every_n_batches=3),
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1)  # log_every_n_steps=1
    trainer.fit(TinyGAN(players), data(64))
    scalars = read_scalars(tmp_path)
    for tag in ("train/generator/loss", "train/loss/fool", "train/weight/fool"):
        assert [step for step, _ in scalars[tag]] == [2, 5], tag  # not its last values again
    for tag in ("train/discriminator/loss", "train/loss/real", "train/weight/real"):
        assert [step for step, _ in scalars[tag]] == list(range(8)), tag
    fool = [value for _, value in scalars["train/loss/fool"]]
    assert fool[0] != fool[1]
    assert float(trainer.callback_metrics["train/loss/fool"]) == pytest.approx(fool[1])
    assert "train/generator/loss" in trainer.progress_bar_metrics


def test_max_steps_counts_the_players_steps_when_one_steps_less_often() -> None:
    players = (
        Player("discriminator", ["real", "fake"]),
        Player("generator", ["fool"], every_n_batches=3),
    )
    model = TinyGAN(players)
    trainer = quiet_trainer(max_steps=5, max_epochs=-1)
    trainer.fit(model, data(64))
    # Batches 0..3: the discriminator steps on each, the generator at batch 2: 5 steps.
    assert model.total_steps == 4
    assert trainer.global_step == 5


class SharedForwardGAN(LossMixModule):
    """The docs' example: one generator forward per batch, shared by both players."""

    def __init__(self, players: tuple[Player, ...]) -> None:
        super().__init__(TERMS, players=players)
        self.discriminator, self.generator = networks()
        self.generator_calls = 0
        self.generator.register_forward_hook(self._count)

    def _count(self, *args: Any) -> None:
        self.generator_calls += 1

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        _, z = batch
        self.fake = self.generator(z)  # before either player moves: the order does not matter

    def compute_losses(
        self, batch: Any, batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        x, z = batch
        fake = self.fake if self.training else self.generator(z)
        if player == "discriminator":
            real_logits, fake_logits = self.discriminator(x), self.discriminator(fake.detach())
            return {
                "real": F.binary_cross_entropy_with_logits(
                    real_logits, torch.ones_like(real_logits)
                ),
                "fake": F.binary_cross_entropy_with_logits(
                    fake_logits, torch.zeros_like(fake_logits)
                ),
            }
        logits = self.discriminator(fake)
        return {"fool": F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = {
            "discriminator": torch.optim.SGD(self.discriminator.parameters(), lr=0.1),
            "generator": torch.optim.SGD(self.generator.parameters(), lr=0.1),
        }
        return [optimizers[player.name] for player in self.players]


@pytest.mark.parametrize("generator_first", [False, True])
def test_two_players_share_one_forward_per_batch(generator_first: bool) -> None:
    players = PLAYERS[::-1] if generator_first else PLAYERS
    model = SharedForwardGAN(players)
    quiet_trainer(max_epochs=1).fit(model, data())
    assert model.generator_calls == 4  # one per batch, whichever player goes first

    discriminator, generator = networks()
    d_opt = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    g_opt = torch.optim.SGD(generator.parameters(), lr=0.1)
    for step, (x, z) in enumerate(data()):
        fake = generator(z)  # the batch's one forward, before either step
        for player in players:
            if player.name == "discriminator":
                real_logits, fake_logits = discriminator(x), discriminator(fake.detach())
                loss = F.binary_cross_entropy_with_logits(
                    real_logits, torch.ones_like(real_logits)
                ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
                d_opt.zero_grad()
                loss.backward()
                d_opt.step()
            else:
                logits = discriminator(fake)
                fool = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
                g_opt.zero_grad()
                (min(step / 4, 1.0) * fool).backward()
                g_opt.step()
    assert_same_parameters(model, (discriminator, generator))
