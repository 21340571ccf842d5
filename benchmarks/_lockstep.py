"""Run several `Trainer.fit` calls in lockstep, one optimizer step each in turn, and time each step.

Why: this machine's speed flips between regimes (a step takes 5.8 ms in one and 9 ms in the
other) for minutes at a time. Two fits run one after the other can fall in different regimes,
and their ratio then says nothing about the code (0.7 or 1.7 for a 2 % effect). Here each fit
runs in its own thread, and a baton lets exactly one of them run at a time, for one optimizer
step: step ``k`` of every fit is taken within a few milliseconds of the others, in the same
regime. The ratio of two fits' times at the same step is free of the regime, and the median
of those per-step ratios is the verdict. The fits take their turns in a new random order every
cycle, so that none is favoured by its place (cache warmth).

All the fits' threads are pinned to one CPU core (`core`): a thread that the scheduler
moves between cores, or two fits on two cores of different speed, gave ratios of 0.68 for two
identical fits; pinned, identical fits measure 1.000 (0.994 to 1.008 across blocks of steps).

A fit holds the baton from its ``on_train_batch_start`` to its next one (or its end): the
loop's own work between two steps (fetching the batch) runs while the others wait, so no two
fits ever run at once; only ``on_train_batch_start`` to ``on_train_batch_end`` is timed.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch


class _Baton:
    """Whose turn it is: each cycle, every fit takes one step, in a new random order.

    A fixed order favours some fits: reversed every cycle, the first and the last fit take two
    steps in a row at each turn of the cycle, with warmer caches (with two fits this is
    symmetric, with more it is not). A random order per cycle (seeded) gives every fit the same
    chances of each predecessor.
    """

    def __init__(self, count: int, seed: int = 0) -> None:
        self.count = count
        self.condition = threading.Condition()
        self.done: set[int] = set()
        self.random = random.Random(seed)
        self.order = list(range(count))
        self.position = 0  # index in this cycle's order

    def _holder(self) -> int:
        return self.order[self.position]

    def _advance(self) -> None:
        """Move the turn to the next fit that has not finished."""
        if len(self.done) == self.count:
            return
        while True:
            self.position += 1
            if self.position == self.count:
                self.position = 0
                self.random.shuffle(self.order)
            if self._holder() not in self.done:
                return

    def wait(self, index: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self._holder() == index)

    def pass_on(self, index: int) -> None:
        with self.condition:
            if self._holder() == index:
                self._advance()
            self.condition.notify_all()

    def finish(self, index: int) -> None:
        with self.condition:
            self.done.add(index)
            if self._holder() == index:
                self._advance()
            self.condition.notify_all()


class StepClock(pl.Callback):
    """Times each training batch of one fit (with a CUDA sync) and takes turns on the baton.

    Args:
        baton: shared by the fits that run in lockstep.
        index: this fit's position.
        measured: called at each batch start; its answer is kept with the step's time (e.g.
            whether a GradientMonitor measures this step).
    """

    def __init__(
        self, baton: _Baton, index: int, measured: Callable[[pl.Trainer], bool] | None = None
    ) -> None:
        self.baton = baton
        self.index = index
        self.measured = measured
        #: Per step: (seconds from batch start to batch end, the answer of `measured`).
        self.steps: list[tuple[float, bool]] = []
        self._started = False
        self._start = 0.0
        self._flag = False

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, i: int) -> None:
        if self._started:
            self.baton.pass_on(self.index)
        self._started = True
        self.baton.wait(self.index)
        _sync(module)
        self._flag = bool(self.measured and self.measured(trainer))
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, o: Any, b: Any, i: int) -> None:
        _sync(module)
        self.steps.append((time.perf_counter() - self._start, self._flag))

    def release(self) -> None:
        """Leave the rotation (the fit ended, or failed)."""
        self.baton.finish(self.index)


def _sync(module: torch.nn.Module) -> None:
    parameter = next(module.parameters(), None)
    if parameter is not None and parameter.is_cuda:
        torch.cuda.synchronize()


def run_lockstep(
    fits: Sequence[Callable[[StepClock], None]],
    measured: Sequence[Callable[[pl.Trainer], bool] | None] | None = None,
    core: int | None = None,
) -> list[StepClock]:
    """Run the fits in lockstep; return each one's clock.

    Args:
        fits: each builds its module and trainer, adds the clock it is given to the trainer's
            callbacks, and calls ``fit``; all should take the same number of steps.
        measured: per fit, an optional flag recorded with each step.
        core: the CPU core every fit runs on (default: the lowest this process may use); on
            systems without ``os.sched_setaffinity`` the threads are not pinned.

    Raises:
        RuntimeError: if a fit raised (its exception is chained).
    """
    baton = _Baton(len(fits))
    clocks = [
        StepClock(baton, i, None if measured is None else measured[i]) for i in range(len(fits))
    ]
    errors: list[BaseException] = []
    pin = getattr(os, "sched_setaffinity", None)
    if pin is not None and core is None:
        core = min(os.sched_getaffinity(0))

    def target(i: int) -> None:
        if pin is not None:
            pin(0, {core})  # 0: the calling thread
        try:
            fits[i](clocks[i])
        except BaseException as error:  # reported below, in the main thread
            errors.append(error)
        finally:
            clocks[i].release()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(fits))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("a fit failed in the lockstep run") from errors[0]
    return clocks


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """The per-step ratios of two fits' times (steps at the same index)."""
    return [a / b for a, b in zip(numerator, denominator, strict=False)]


def spread(values: Sequence[float], blocks: int = 5) -> tuple[float, float]:
    """The lowest and highest median of `blocks` consecutive blocks of `values`."""
    size = max(1, len(values) // blocks)
    medians = [
        statistics.median(values[i : i + size]) for i in range(0, len(values) - size + 1, size)
    ]
    return min(medians), max(medians)


class PhaseTimer:
    """Times chosen methods, per fit, while it is active: where a step's time goes.

    Each method is replaced by a wrapper that adds its duration to the list of the fit whose
    thread called it (`run_lockstep` runs each fit in its own thread; `fit_name` names the
    calling thread's fit). A call nested in another timed call counts in both. The wrappers
    cost about a microsecond per call, in every fit alike; run without them for the ratios.

    Args:
        methods: label to (class, method name).
    """

    def __init__(self, methods: dict[str, tuple[type, str]]) -> None:
        self.methods = methods
        self.times: dict[tuple[str, str], list[float]] = {}
        self._saved: list[tuple[type, str, Any]] = []

    @staticmethod
    def fit_name(name: str) -> None:
        """Name the calling thread's fit (call it first thing in the fit's function)."""
        threading.current_thread().name = name

    def __enter__(self) -> PhaseTimer:
        for label, (owner, attribute) in self.methods.items():
            original = owner.__dict__[attribute]
            self._saved.append((owner, attribute, original))
            setattr(owner, attribute, self._timed(label, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attribute, original in reversed(self._saved):
            setattr(owner, attribute, original)
        self._saved.clear()

    def _timed(self, label: str, original: Callable[..., Any]) -> Callable[..., Any]:
        times = self.times

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                key = (threading.current_thread().name, label)
                times.setdefault(key, []).append(time.perf_counter() - start)

        return timed

    def median_us(self, fit: str, label: str, skip: int = 0) -> float | None:
        """The median duration of `label`'s calls in `fit`, in µs (None if never called)."""
        found = self.times.get((fit, label), [])[skip:]
        return statistics.median(found) * 1e6 if found else None
