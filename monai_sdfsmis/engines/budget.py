"""Iteration and wall-clock budgets of a training run, from library parts.

The learning-rate schedule is a ``transformers``-style warm-up schedule from
``diffusers.optimization`` (a ``torch.optim.lr_scheduler.LambdaLR`` that scales each parameter
group's own learning rate), stepped every iteration by MONAI's
:class:`~monai.handlers.LrScheduleHandler`; the wall-clock limit is ignite's
:class:`~ignite.handlers.TimeLimit`, started when training starts.

A decaying schedule runs over ``max_iterations``. With only ``max_seconds`` (a GPU run measured in
minutes, whose speed is not known beforehand) its length is estimated from the measured seconds per
iteration and re-estimated every ``horizon_every`` iterations (the same diffusers schedule, rebuilt
for the new length), so that it ends when the time does. With both, the iterations set the schedule
and the seconds are a hard stop (a run stopped by them has not finished its schedule, which
:attr:`TrainingBudget.stopped_by` tells).
"""

from __future__ import annotations

__all__ = ["SCHEDULES", "TrainingBudget", "attach_budget"]

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from ignite.engine import Engine, Events
from ignite.handlers import TimeLimit

SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainingBudget:
    """What a budgeted run spent; filled in by the handlers :func:`attach_budget` installs.

    Attributes
    ----------
    max_iterations, max_seconds
        The budget (``None``: unlimited). ``max_iterations`` counts from the run's first iteration, also after a
        resume: a resumed run stops where an uninterrupted one would.
    iterations
        Iterations run in this call of ``engine.run()`` (after a resume: since the resume).
    start_iteration
        The engine's iteration when this call started: 0, or the checkpoint's iteration after a resume.
    elapsed
        Training-loop seconds, without the time spent inside :meth:`paused`.
    stopped_by
        ``"iterations"``, ``"time"`` or ``None`` (ran to the end of its data or has not stopped yet).
    """

    max_iterations: int | None = None
    max_seconds: float | None = None
    iterations: int = 0
    start_iteration: int = 0
    elapsed: float = 0.0
    stopped_by: str | None = None
    _time_limit: TimeLimit | None = field(default=None, repr=False)
    _start: float | None = field(default=None, repr=False)
    _paused_seconds: float = field(default=0.0, repr=False)

    def seconds(self) -> float:
        """Training seconds so far (pauses excluded)."""
        if self._start is None:
            return 0.0
        return time.perf_counter() - self._start - self._paused_seconds

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clocks (this record's and the ``TimeLimit``'s) inside the block, e.g. for a mid-run evaluation."""
        t0 = time.perf_counter()
        wall0 = time.time()
        try:
            yield
        finally:
            self._paused_seconds += time.perf_counter() - t0
            if self._time_limit is not None:
                self._time_limit.start_time += time.time() - wall0


def _lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int | None):
    from diffusers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    factory = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    return factory(optimizer, num_warmup_steps=warmup, num_training_steps=max(int(total), warmup + 1))


def _set_horizon(scheduler: torch.optim.lr_scheduler.LambdaLR, schedule: str, warmup: int, total: int) -> None:
    """Give ``scheduler`` the factors of the same diffusers schedule over ``total`` iterations, keeping its step."""
    optimizer = scheduler.optimizer
    lrs = [group["lr"] for group in optimizer.param_groups]
    fresh = _lr_scheduler(optimizer, schedule, warmup, total)  # builds the lambdas; resets lr, restored below
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.lr_lambdas = fresh.lr_lambdas


def attach_budget(
    engine: Engine,
    optimizer: torch.optim.Optimizer | None = None,
    max_iterations: int | None = None,
    max_seconds: float | None = None,
    schedule: str = "constant",
    warmup_iterations: int = 0,
    horizon_every: int = 25,
) -> TrainingBudget:
    """Stop ``engine`` after ``max_iterations`` and/or ``max_seconds`` and schedule the learning rate.

    Parameters
    ----------
    engine
        An ignite engine (e.g. a MONAI ``SupervisedTrainer``).
    optimizer
        Whose parameter groups' learning rates are scheduled (default ``engine.optimizer``).
    max_iterations
        Iteration budget; also the length of a decaying schedule (``None``: unlimited).
    max_seconds
        Wall-clock budget counted from the start of training (``None``: unlimited); rounded up to whole seconds.
    schedule
        ``"constant"``, ``"cosine"`` or ``"linear"`` decay to 0 of every group's initial ``lr`` (after warm-up).
    warmup_iterations
        Linear warm-up from 0.
    horizon_every
        Time-only budgets with a decaying schedule: iterations between estimates of the schedule's length.

    Returns
    -------
    TrainingBudget
        Filled in as the run goes.
    """
    _check_budget(max_iterations, max_seconds, schedule, warmup_iterations, horizon_every)
    optimizer = optimizer or getattr(engine, "optimizer", None)
    if optimizer is None:
        raise ValueError("attach_budget needs an optimizer (engine.optimizer or the optimizer argument).")
    from monai.handlers import LrScheduleHandler

    budget = TrainingBudget(None if max_iterations is None else int(max_iterations), max_seconds)
    warmup = int(warmup_iterations)
    timed_horizon = schedule != "constant" and budget.max_iterations is None
    # A first guess until the speed is measured: the warm-up plus as many iterations again.
    horizon = budget.max_iterations if not timed_horizon else 2 * max(warmup, horizon_every)
    scheduler = _lr_scheduler(optimizer, schedule, warmup, horizon)
    LrScheduleHandler(scheduler, print_lr=False, epoch_level=False).attach(engine)
    _BudgetHandlers(budget, scheduler, schedule, warmup, horizon_every, timed_horizon).attach(engine)
    return budget


@dataclass
class _BudgetHandlers:
    """The ignite handlers of one :func:`attach_budget` call: they fill in ``budget``, stop the engine when it is
    spent and, for a time-only budget with a decaying schedule, fit the schedule's length to the measured speed."""

    budget: TrainingBudget
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: str
    warmup: int
    horizon_every: int
    timed_horizon: bool

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.completed_iteration)
        engine.add_event_handler(Events.COMPLETED | Events.TERMINATE, self.stopped)

    def _reestimate_horizon(self) -> None:
        budget = self.budget
        seconds = budget.seconds()
        if seconds <= 0:
            return
        left = max(float(budget.max_seconds) - seconds, 0.0)
        done = budget.start_iteration + budget.iterations
        _set_horizon(self.scheduler, self.schedule, self.warmup, done + int(left * budget.iterations / seconds) + 1)

    def started(self, engine: Engine) -> None:
        budget = self.budget
        budget._start = time.perf_counter()
        budget._paused_seconds = 0.0
        budget.iterations = 0
        budget.stopped_by = None
        if budget.max_seconds is not None:
            # ceil: TimeLimit takes whole seconds
            budget._time_limit = TimeLimit(max(1, int(-(-budget.max_seconds // 1))))
        # A resume (a handler attached before this one restored the engine) goes on from the checkpoint's iteration.
        budget.start_iteration = int(engine.state.iteration)
        if budget.start_iteration:
            _continue_resumed_run(engine, budget, self.scheduler)

    def completed_iteration(self, engine: Engine) -> None:
        budget = self.budget
        budget.iterations += 1
        if self.timed_horizon and budget.iterations % self.horizon_every == 0:
            self._reestimate_horizon()
        if budget.max_iterations is not None and budget.start_iteration + budget.iterations >= budget.max_iterations:
            budget.stopped_by = "iterations"
            engine.terminate()
        elif budget._time_limit is not None:
            budget._time_limit(engine)
            if engine.should_terminate:
                budget.stopped_by = "time"

    def stopped(self, engine: Engine) -> None:
        if self.budget._start is not None:
            self.budget.elapsed = self.budget.seconds()


def _check_budget(
    max_iterations: int | None, max_seconds: float | None, schedule: str, warmup_iterations: int, horizon_every: int
) -> None:
    if max_iterations is None and max_seconds is None:
        raise ValueError("a training budget needs max_iterations, max_seconds or both.")
    if max_iterations is not None and int(max_iterations) < 1:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations}.")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}.")
    if horizon_every < 1:
        raise ValueError(f"horizon_every must be >= 1, got {horizon_every}.")
    if warmup_iterations < 0:
        raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}.")


def _continue_resumed_run(engine: Engine, budget: TrainingBudget, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Go on from the checkpoint's iteration ``budget.start_iteration``: refuse a plan shorter than what was done, and
    put the schedule at that step, as in the uninterrupted run, instead of starting a new warm-up."""
    start, planned = budget.start_iteration, budget.max_iterations
    if planned is not None and start > planned:
        raise ValueError(
            f"the resumed checkpoint is at iteration {start}, beyond the {planned} iterations this run "
            f"plans; plan at least {start} iterations (--iterations) to resume from it, or start afresh elsewhere"
        )
    scheduler.last_epoch = start - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        scheduler.step()
    engine.logger.info(
        f"resumed at iteration {start}: training goes on "
        + (f"to iteration {planned}" if planned is not None else "until the time is up")
    )
    if planned is not None and start >= planned:
        budget.stopped_by = "iterations"
        engine.terminate()
