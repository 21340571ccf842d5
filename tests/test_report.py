"""The report: logs of real fits read back, the data behind each chart, the page and the CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.callbacks import GradientMonitor
from lightning_lossmix.callbacks._summary import summary_table
from lightning_lossmix.report import (
    Alert,
    RunData,
    Series,
    load_runs,
    main,
    relative,
    run_data,
    write_report,
)
from lightning_lossmix.report._data import shares
from lightning_lossmix.report._draw import term_colors
from lightning_lossmix.report._load import _without_logger_prefix, read_csv
from tests._tensorboard import read_scalars

TERMS = ("fit", "smooth.l1", "small-term")


class TwoHeads(LossMixModule):
    """A trunk shared by three terms; `head` is reached by `fit` alone (no share tags there)."""

    def __init__(self, small: float = 1.0) -> None:
        super().__init__(
            [
                LossTerm("fit"),
                LossTerm("smooth.l1", weight=0.5),
                LossTerm("small-term", weight=small),
            ]
        )
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.side = nn.Linear(8, 1)

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        h = self.trunk(x)
        side = self.side(h).squeeze(-1)
        return {
            "fit": nn.functional.mse_loss(self.head(h).squeeze(-1), y),
            "smooth.l1": nn.functional.smooth_l1_loss(side, y),
            "small-term": side.pow(2).mean(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loaders() -> tuple[DataLoader, DataLoader]:
    torch.manual_seed(0)
    x = torch.randn(96, 4)
    y = x.sum(-1).sin() + 0.5 * torch.randn(96)  # noisy: no term's gradient vanishes
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=8), DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)


def _fit(root: Path, small: float, monitor: bool = True) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=[
            TensorBoardLogger(root, name="tb", version=f"small_{small:g}"),
            CSVLogger(root, name="csv", version=f"small_{small:g}"),
        ],
        callbacks=[GradientMonitor(every_n_steps=3)] if monitor else [],
        log_every_n_steps=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TwoHeads(small), *_loaders())


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real monitored fits (small-term x1 and x4), each logged to TensorBoard and CSV."""
    root = tmp_path_factory.mktemp("fits")
    _fit(root, 1.0)
    _fit(root, 4.0)
    return root


def _data(path: Path) -> RunData:
    (logs,) = load_runs([path])
    return run_data(logs)


def test_shares_sum_to_one_and_match_the_logged_values(fits: Path) -> None:
    run = _data(fits / "tb" / "small_1")
    logged = read_scalars(fits / "tb" / "small_1")
    assert run.terms == TERMS
    assert set(run.groups) == {"trunk", "head", "side", "all"} and run.groups[-1] == "all"
    trunk = run.shares["trunk"]
    assert set(trunk) == set(TERMS)
    steps = trunk["fit"].steps
    assert steps == tuple(s for s, _ in logged["grad_share/trunk/fit"]) and len(steps) >= 4
    for i in range(len(steps)):
        assert math.fsum(s.values[i] for s in trunk.values()) == pytest.approx(1.0, abs=1e-6)
    for term in TERMS:
        assert trunk[term].values == tuple(v for _, v in logged[f"grad_share/trunk/{term}"])
    # `head` is reached by `fit` alone: no share tags, a share of 1 from the magnitudes.
    assert not any(tag.startswith("grad_share/head/") for tag in logged)
    assert set(run.shares["head"]) == {"fit"} and set(run.shares["head"]["fit"].values) == {1.0}
    assert set(run.magnitudes["head"]) == {"fit"}


def test_each_chart_matches_the_logged_values(fits: Path) -> None:
    run = _data(fits / "tb" / "small_1")
    logged = read_scalars(fits / "tb" / "small_1")

    def series(tag: str) -> Series:
        return Series(tuple(s for s, _ in logged[tag]), tuple(v for _, v in logged[tag]))

    for term in TERMS:
        assert run.magnitudes["trunk"][term] == series(f"grad_magnitude/trunk/{term}")
        assert run.weights[term] == series(f"train/weight/{term}")
        assert run.suggested[term] == series(f"grad_suggested_weight/{term}")
        assert run.val[term] == series(f"val/loss/{term}")
        raw = series(f"train/loss/{term}")
        assert run.losses[term].steps == raw.steps
        assert [v * abs(raw.values[0]) for v in run.losses[term].values] == pytest.approx(
            raw.values, rel=1e-6
        )
    cosine = series("grad_cosine/trunk/smooth.l1_vs_small-term")
    assert run.cosines["trunk"][("smooth.l1", "small-term")] == cosine
    matrix = run.cosine_matrices["trunk"]
    i, j = matrix.terms.index("smooth.l1"), matrix.terms.index("small-term")
    mean = sum(cosine.values) / len(cosine.values)
    assert matrix.values[i][j] == matrix.values[j][i] == pytest.approx(mean)
    assert matrix.values[i][i] == 1.0
    assert run.missing == ()


def test_csv_logs_give_the_same_data_as_tensorboard(fits: Path) -> None:
    tb, csv = _data(fits / "tb" / "small_4"), _data(fits / "csv" / "small_4")
    # CSVLogger sorts its columns: the same terms and groups, in another order.
    assert (set(csv.terms), set(csv.groups)) == (set(tb.terms), set(tb.groups))
    for group in tb.groups:
        for term, s in tb.shares[group].items():
            assert csv.shares[group][term].steps == s.steps
            assert csv.shares[group][term].values == pytest.approx(s.values, rel=1e-6)
    for term, s in tb.suggested.items():
        assert csv.suggested[term].values == pytest.approx(s.values, rel=1e-6)
    # A term has the same colour whichever format, or order of runs, a report reads.
    assert tb.terms != csv.terms
    colours = term_colors([tb])
    assert term_colors([csv]) == colours
    assert term_colors([csv, tb]) == term_colors([tb, csv]) == colours


def test_players_measured_at_one_step_share_one_stack() -> None:
    # Each player's logged shares sum to 1 over its own terms; stacked together they made 2.
    logged = {"real": 0.6, "fake": 0.4, "fool": 0.8, "smooth": 0.2}
    pulls = {"real": 3.0, "fake": 2.0, "fool": 4.0, "smooth": 1.0}
    scalars = {f"grad_share/all/{t}": Series((5,), (v,)) for t, v in logged.items()}
    scalars |= {f"grad_magnitude/all/{t}": Series((5,), (v,)) for t, v in pulls.items()}
    found = shares(scalars, "all", list(logged))
    assert {t: s.values[0] for t, s in found.items()} == pytest.approx(
        {t: v / 10.0 for t, v in pulls.items()}
    )
    metrics = {tag: s.values[0] for tag, s in scalars.items()}
    table = summary_table(metrics, 5, None)
    assert "all    0.300  0.200  0.400  0.100" in table, table
    # A player with one term logs no share: its shares' sum is 1 and yet a term is missing.
    del scalars["grad_share/all/fool"], scalars["grad_share/all/smooth"]
    del scalars["grad_magnitude/all/smooth"]
    found = shares(scalars, "all", list(logged))
    assert {t: s.values[0] for t, s in found.items()} == pytest.approx(
        {"real": 3 / 9, "fake": 2 / 9, "fool": 4 / 9}
    )
    table = summary_table({tag: s.values[0] for tag, s in scalars.items()}, 5, None)
    assert "all    0.333  0.222  0.444" in table, table


def test_a_logger_prefix_is_taken_off_the_tags(fits: Path, tmp_path: Path) -> None:
    pl.seed_everything(0)
    pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=[
            TensorBoardLogger(tmp_path, name="tb", version="", prefix="exp"),
            CSVLogger(tmp_path, name="csv", version="", prefix="exp"),
        ],
        callbacks=[GradientMonitor(every_n_steps=3, summary=False)],
        log_every_n_steps=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(TwoHeads(1.0), *_loaders())
    assert any(tag.startswith("exp-grad_share/") for tag in read_scalars(tmp_path / "tb"))
    plain = _data(fits / "tb" / "small_1")
    for kind in ("tb", "csv"):
        run = _data(tmp_path / kind)
        assert (set(run.terms), set(run.groups)) == (set(plain.terms), set(plain.groups)), kind
        assert not run.missing, kind
        assert run.shares["all"].keys() == plain.shares["all"].keys()


@pytest.mark.parametrize("prefix", ["exp", "grad_run", "train", "runs/a"])
def test_a_prefix_that_looks_like_a_package_tag_is_taken_off_too(prefix: str) -> None:
    tags = ["train/loss", "train/weight/fit", "grad_share/all/fit", "epoch"]
    points = {f"{prefix}-{tag}": {1: 0.5} for tag in tags}
    assert sorted(_without_logger_prefix(points)) == sorted(tags)
    plain = {tag: {1: 0.5} for tag in tags}
    assert _without_logger_prefix(plain) == plain


def test_tensorboard_and_csv_files_in_one_folder_are_one_run(fits: Path, tmp_path: Path) -> None:
    import shutil

    for kind in ("tb", "csv"):
        for file in (fits / kind / "small_1").iterdir():
            shutil.copy(file, tmp_path / file.name)
    merged, tb = _data(tmp_path), _data(fits / "tb" / "small_1")
    assert [log.name for log in load_runs([tmp_path])] == [tmp_path.name]
    assert len(load_runs([tmp_path])[0].files) == 2
    assert merged.shares["trunk"].keys() == tb.shares["trunk"].keys()
    for term, series in tb.shares["trunk"].items():
        assert merged.shares["trunk"][term] == series  # TensorBoard's values win on a tie


def test_a_folder_of_runs_and_the_page(
    fits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = load_runs([fits / "tb"])
    assert [r.name for r in logs] == ["small_1", "small_4"]
    monkeypatch.chdir(fits)  # a relative path names the runs the same way
    assert [r.name for r in load_runs([Path("tb")])] == ["small_1", "small_4"]
    assert [r.name for r in load_runs(["tb/small_1", "csv/small_1"])] == [
        "tb/small_1",
        "csv/small_1",
    ]
    page = write_report([fits / "tb"], tmp_path / "out")
    assert page == tmp_path / "out" / "index.html"
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(list((tmp_path / "out").glob("*.png")))
    names = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert {"shares_trunk.png", "cosines_trunk.png", "weights.png", "losses.png"} <= names
    assert "shares_head.png" not in names  # one term reaches it: its share is always 1
    assert "small_1" in text and "small_4" in text


def test_synthetic_tags_names_alerts_and_missing_terms(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step in (0, 5, 10):
        writer.add_scalar("train/weight/a_vs_b", 1.0, step)
        writer.add_scalar("train/weight/c.d-e", 2.0, step)
        writer.add_scalar("train/loss/a_vs_b", 4.0 - step / 5, step)
        writer.add_scalar("train/loss/c.d-e", -2.0, step)
        writer.add_scalar("grad_magnitude/en_c.1/a_vs_b", 3.0, step)
        writer.add_scalar("grad_magnitude/en_c.1/c.d-e", 1.0, step)
        if step != 5:  # at step 5 only `a_vs_b` reached the group: no share tags
            writer.add_scalar("grad_share/en_c.1/a_vs_b", 0.75, step)
            writer.add_scalar("grad_share/en_c.1/c.d-e", 0.25, step)
            writer.add_scalar("grad_cosine/en_c.1/a_vs_b_vs_c.d-e", -0.5, step)
    writer.add_scalar("grad_alert/drowns_en_c.1/a_vs_b", 1.0, 10)
    writer.add_scalar("grad_alert/unbounded/c.d-e", 1.0, 5)
    writer.close()
    run = _data(tmp_path / "run")
    assert run.terms == ("a_vs_b", "c.d-e") and run.groups == ("en_c.1",)
    shares = run.shares["en_c.1"]
    assert shares["a_vs_b"].values == (0.75, 0.75, 0.75)  # step 5: 3 / (3 + 1)
    assert shares["c.d-e"].values == (0.25, 0.25, 0.25)
    assert set(run.cosines["en_c.1"]) == {("a_vs_b", "c.d-e")}
    assert run.alerts == (Alert(5, "unbounded", "c.d-e"), Alert(10, "drowns_en_c.1", "a_vs_b"))
    assert run.losses["c.d-e"].values == (-1.0, -1.0, -1.0)  # over |first value|
    assert run.losses["a_vs_b"].values == (1.0, 0.75, 0.5)
    assert any("suggested weights" in m for m in run.missing)
    assert any("validation means" in m for m in run.missing)
    page = write_report([tmp_path / "run"], tmp_path / "out").read_text()
    assert "<h2>Warnings (2)</h2>" in page
    assert "<td>10</td><td>drowns_en_c.1</td><td>a_vs_b</td>" in page


def test_logs_without_monitor_figures_say_what_is_missing(tmp_path: Path) -> None:
    _fit(tmp_path, 1.0, monitor=False)
    run = _data(tmp_path / "tb" / "small_1")
    assert run.groups == () and run.shares == {} and set(run.weights) == set(TERMS)
    assert any("GradientMonitor" in m for m in run.missing)
    page = write_report([tmp_path / "tb" / "small_1"], tmp_path / "out").read_text()
    assert "GradientMonitor" in page and "weights.png" not in page  # embedded, not linked
    assert (tmp_path / "out" / "weights.png").exists()


def read_csv_text(tmp_path: Path, text: str) -> dict[str, dict[int, float]]:
    path = tmp_path / "whole" / "metrics.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return read_csv(path)


def test_a_run_still_being_written(fits: Path, tmp_path: Path) -> None:
    (events,) = (fits / "tb" / "small_1").glob("events.out.tfevents.*")
    data = events.read_bytes()
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / events.name).write_bytes(data[: len(data) * 2 // 3 - 7])  # cut mid-record
    run = _data(tmp_path / "tb")
    assert (
        0 < len(run.weights["fit"].steps) < len(_data(fits / "tb" / "small_1").weights["fit"].steps)
    )
    text = (fits / "csv" / "small_1" / "metrics.csv").read_text()
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        text[: len(text) // 2].rsplit(",", 1)[0] + ",1.2e"
    )
    assert _data(tmp_path / "csv").weights["fit"].steps
    # A last line cut where it still parses: the step "15" read as "1" put figures at step 1.
    lines = text.splitlines(keepends=True)
    kept = next(k for k in range(len(lines) - 1, 1, -1) if lines[k].rstrip("\n")[-2:].isdigit())
    cut = lines[kept].rstrip("\n")[:-1]  # the last column, the step, loses its last digit
    (tmp_path / "csv" / "metrics.csv").write_text("".join(lines[:kept]) + cut)
    whole = read_csv(fits / "csv" / "small_1" / "metrics.csv")
    partial = read_csv(tmp_path / "csv" / "metrics.csv")
    assert partial == read_csv_text(tmp_path, "".join(lines[:kept]))
    assert partial != whole
    empty = tmp_path / "new" / "events.out.tfevents.1.host.1.0"
    empty.parent.mkdir()
    empty.touch()  # the logger has created the file and written nothing yet
    assert _data(empty.parent).missing == (
        "no scalars yet: the run has just started, or logs nothing",
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: p, "no logs under"),
        (lambda p: _write(p / "events.out.tfevents.1.x", b"\x00garbage" * 40), "cannot read"),
        (lambda p: _write(p / "metrics.csv", b"epoch,loss\n0,1.0\n"), "no 'step' column"),
        (lambda p: _write(p / "metrics.csv", b"step,loss\n0,abc\n1,2.0\n"), "line 2"),
        (lambda p: _write(p / "metrics.csv", b"step,loss\n\xff\xfe\n"), "cannot read"),
        (lambda p: _write(p / "notes.txt", b"hello"), "not a log file"),
    ],
)
def test_errors_exit_with_code_2(
    make: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    assert main(["report", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-lossmix: error: report:") and message in err
    assert not (tmp_path / "out" / "index.html").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_without_matplotlib_it_says_how_to_install_it(
    fits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["report", str(fits / "tb"), "-o", str(tmp_path / "out")]) == 2
    assert 'pip install "lightning-lossmix[report]"' in capsys.readouterr().err


def test_python_dash_m(fits: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_lossmix",
            "report",
            str(fits / "csv"),
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Report: {tmp_path / 'index.html'}"


def test_relative_keeps_the_sign_and_skips_a_first_zero() -> None:
    assert relative(Series((0, 1, 2), (0.0, -2.0, 4.0))).values == (0.0, -1.0, 2.0)


def write_synthetic_run(folder: Path, terms: int = 4, groups: int = 8, steps: int = 600) -> None:
    """A monitored run's tags, as the monitor writes them: `terms` terms on `groups` groups
    plus ``all``, measured every 10 steps (used for the draw time in docs/report.md)."""
    from torch.utils.tensorboard import SummaryWriter

    names = [f"term_{i}" for i in range(terms)]
    generator = torch.Generator().manual_seed(0)
    writer = SummaryWriter(str(folder))
    for step in range(0, steps, 10):
        for i, name in enumerate(names):
            writer.add_scalar(f"train/weight/{name}", float(i + 1), step)
            writer.add_scalar(f"train/loss/{name}", 1.0 / (1 + step / 100) + i, step)
            writer.add_scalar(f"grad_suggested_weight/{name}", 1.0 + i * 0.5, step)
        for group in [f"layer{g}" for g in range(groups)] + ["all"]:
            pulls = torch.rand(terms, generator=generator) + 0.01
            for name, pull in zip(names, pulls.tolist(), strict=True):
                writer.add_scalar(f"grad_magnitude/{group}/{name}", pull, step)
                writer.add_scalar(f"grad_share/{group}/{name}", pull / pulls.sum().item(), step)
            for a in range(terms):
                for b in range(a + 1, terms):
                    cosine = 2 * torch.rand(1, generator=generator).item() - 1
                    writer.add_scalar(f"grad_cosine/{group}/{names[a]}_vs_{names[b]}", cosine, step)
        if step % 50 == 0:
            for name in names:
                writer.add_scalar(f"val/loss/{name}", 1.0 / (1 + step / 100), step)
    writer.add_scalar("grad_alert/drowns_layer0/term_0", 1.0, 100)
    writer.close()


def test_a_four_term_eight_group_run(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path / "run")
    run = _data(tmp_path / "run")
    assert len(run.terms) == 4 and len(run.groups) == 9 and len(run.cosines["layer3"]) == 6
    write_report([tmp_path / "run"], tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.png"))) == 9 * 3 + 2


def test_the_command_imports_neither_torch_nor_lightning(tmp_path: Path) -> None:
    # It reads logs: importing torch and Lightning took 3.5 of its 6.4 s (docs/report.md).
    write_synthetic_run(tmp_path / "run", terms=2, groups=1, steps=20)
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    code = (
        "import sys\n"
        "from lightning_lossmix.report import main\n"
        f"assert main(['report', {run!r}, '-o', {out!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "index.html").exists()


def test_the_console_script_is_installed() -> None:
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="lightning-lossmix")
    assert script.load() is main
