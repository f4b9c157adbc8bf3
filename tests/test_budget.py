"""attach_budget: the learning-rate schedule against the formula by hand, iteration and time stops, pauses."""

from __future__ import annotations

import math
import time

import pytest
import torch
from ignite.engine import Engine, Events

from monai_sdfsmis.engines.budget import attach_budget


def _engine_and_optimizer(lr: float = 1.0) -> tuple[Engine, torch.optim.Optimizer]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": lr}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2 * lr}])
    return Engine(lambda e, b: None), optimizer


def _recorded_lrs(engine: Engine, optimizer: torch.optim.Optimizer) -> list[list[float]]:
    seen: list[list[float]] = []
    engine.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append([g["lr"] for g in optimizer.param_groups]))
    return seen


def test_cosine_schedule_with_warmup_follows_the_formula_and_stops_at_max_iterations():
    engine, optimizer = _engine_and_optimizer(0.5)
    seen = _recorded_lrs(engine, optimizer)
    budget = attach_budget(engine, optimizer, max_iterations=40, schedule="cosine", warmup_iterations=8)
    engine.run(range(1000), max_epochs=1)
    assert budget.iterations == 40 == len(seen) and budget.stopped_by == "iterations"
    for step, lrs in enumerate(seen):  # iteration step + 1 runs with the factor of step (0-based)
        factor = step / 8 if step < 8 else 0.5 * (1 + math.cos(math.pi * (step - 8) / (40 - 8)))
        assert lrs == pytest.approx([0.5 * factor, 1.0 * factor]), step  # each group keeps its own base lr


def test_linear_and_constant_schedules():
    engine, optimizer = _engine_and_optimizer()
    seen = _recorded_lrs(engine, optimizer)
    attach_budget(engine, optimizer, max_iterations=10, schedule="linear")
    engine.run(range(100), max_epochs=1)
    assert [round(lr[0], 6) for lr in seen] == [round(1 - s / 10, 6) for s in range(10)]

    engine, optimizer = _engine_and_optimizer()
    seen = _recorded_lrs(engine, optimizer)
    attach_budget(engine, optimizer, max_iterations=6, schedule="constant", warmup_iterations=2)
    engine.run(range(100), max_epochs=1)
    assert [lr[0] for lr in seen] == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]


def test_time_budget_stops_an_endless_run_and_pauses_are_not_counted():
    engine, optimizer = _engine_and_optimizer()
    budget = attach_budget(engine, optimizer, max_seconds=1.0)
    paused = {"done": False}

    def step(e: Engine) -> None:
        time.sleep(0.01)
        if e.state.iteration == 5 and not paused["done"]:
            paused["done"] = True
            with budget.paused():
                time.sleep(1.5)  # longer than the whole budget: it must not stop the run by itself

    engine.add_event_handler(Events.ITERATION_COMPLETED, step)
    t0 = time.perf_counter()
    engine.run(range(10**9), max_epochs=1)
    wall = time.perf_counter() - t0
    assert budget.stopped_by == "time" and budget.iterations > 5
    assert 1.0 <= budget.elapsed < 2.5 and wall >= budget.elapsed + 1.4


def test_bad_budgets_are_refused_with_a_reason():
    engine, optimizer = _engine_and_optimizer()
    with pytest.raises(ValueError, match="needs max_iterations, max_seconds"):
        attach_budget(engine, optimizer)
    with pytest.raises(ValueError, match="schedule"):
        attach_budget(engine, optimizer, 10, schedule="step")
    with pytest.raises(ValueError, match="horizon_every"):
        attach_budget(engine, optimizer, max_seconds=5, schedule="cosine", horizon_every=0)
    with pytest.raises(ValueError, match="optimizer"):
        attach_budget(Engine(lambda e, b: None), None, 10)


def test_time_only_cosine_schedule_ends_when_the_time_does():
    """Its length is re-estimated from the measured speed, so the learning rate has decayed when time runs out."""
    engine, optimizer = _engine_and_optimizer()
    seen = _recorded_lrs(engine, optimizer)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: time.sleep(0.01))
    budget = attach_budget(engine, optimizer, max_seconds=1.0, schedule="cosine", warmup_iterations=5, horizon_every=5)
    engine.run(range(10**9), max_epochs=1)
    assert budget.stopped_by == "time" and budget.iterations > 40
    lrs = [lr[0] for lr in seen]
    assert lrs[:5] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])  # the warm-up does not depend on the horizon
    assert max(lrs) <= 1.0 and lrs[len(lrs) // 2] > 0.2 and lrs[-1] < 0.15
