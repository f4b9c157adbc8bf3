"""Kill-and-resume of the training bundle: a run killed with SIGKILL after a checkpoint and resumed with
``--resume true`` trains on the same episode stream, to the same iteration and optimizer state, as a run that
was never interrupted; the checkpoint folder is left as an uninterrupted run leaves it.

Each run is ``python -m monai.bundle run training`` in a subprocess (tiny network, 64x64 slices, 30 iterations,
three CHAOS training volumes). A handler added through a second config file records, after every iteration,
the iteration and the ``episode_index`` of each episode of its batch, flushed to disk so that it survives the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.utils import REPO_ROOT, link_chaos_subset, requires_chaos

BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"
ITERATIONS, CKPT_INTERVAL, KILL_AFTER = 30, 5, 10
SETTINGS = {
    "iterations": ITERATIONS, "ckpt_interval": CKPT_INTERVAL, "spatial_size": 64, "num_workers": 0,
    "folds": [[0, 1]], "support_position": 0, "organ_ids": [1], "amp": False, "device": "$torch.device('cpu')",
}


class EpisodeStreamRecorder:
    """Ignite handler: appends ``"<iteration> <episode_index> ..."`` to ``path`` after every iteration, fsynced."""

    def __init__(self, path: str) -> None:
        self.path = path

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        indices = " ".join(str(int(i)) for i in torch.as_tensor(engine.state.batch["episode_index"]).flatten())
        with open(self.path, "a") as handle:
            handle.write(f"{engine.state.iteration} {indices}\n")
            handle.flush()
            os.fsync(handle.fileno())


def _command(data: Path, out: Path, resume: bool) -> list[str]:
    extra = out / "record.json"
    extra.write_text(json.dumps({
        "+train::handlers": [{"_target_": "tests.test_resume.EpisodeStreamRecorder", "path": str(out / "stream.txt")}],
        "run": ["$@train::trainer.run()"],
    }))
    configs = f"['configs/train.json','configs/quickstart.json','{extra}']"
    overrides = {**SETTINGS, "dataset_dir": str(data), "output_dir": str(out), "resume": resume}
    args = [item for key, value in overrides.items() for item in (f"--{key}", json.dumps(value))]
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs, *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SDFSMIS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(data: Path, out: Path, resume: bool = False) -> None:
    proc = subprocess.run(_command(data, out, resume), cwd=BUNDLE, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _run_and_kill(data: Path, out: Path, after: Path) -> None:
    """Start a run and SIGKILL it as soon as ``after`` exists."""
    log = open(out / "killed.log", "w")
    proc = subprocess.Popen(_command(data, out, False), cwd=BUNDLE, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not after.exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {after.name}: see {log.name}"
            assert time.monotonic() < deadline, f"no {after.name} within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _stream(out: Path) -> dict[int, list[int]]:
    """``{iteration: episode indices}``; a later line for an iteration replaces an earlier one (a replay)."""
    stream: dict[int, list[int]] = {}
    for line in (out / "stream.txt").read_text().splitlines():
        iteration, *indices = (int(v) for v in line.split())
        stream[iteration] = indices
    return stream


def _stream_lines(out: Path) -> list[int]:
    return [int(line.split()[0]) for line in (out / "stream.txt").read_text().splitlines()]


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@requires_chaos
def test_a_run_killed_after_a_checkpoint_resumes_as_if_never_interrupted(tmp_path):
    data = link_chaos_subset(tmp_path / "data", (1, 2, 3, 5, 8))
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    reference.mkdir()
    resumed.mkdir()
    _run(data, reference)

    models = resumed / "models"
    _run_and_kill(data, resumed, models / f"checkpoint_iteration={KILL_AFTER}.pt")
    killed_at = max(_stream_lines(resumed))
    assert killed_at < ITERATIONS and not (models / "model.pt").exists(), "the kill came after the run finished"
    # The newest checkpoint on disk; the kill may come before the recorder's line of its iteration (the saver runs
    # first at ITERATION_COMPLETED), so it is read from the folder, not derived from the stream.
    restart_from = max(int(p.stem.split("=")[1]) for p in models.glob("checkpoint_iteration=*.pt"))
    assert restart_from >= KILL_AFTER and killed_at >= restart_from - 1
    # What a kill during a checkpoint write leaves: ignite's 0-byte NamedTemporaryFile and a partial file of ours.
    (models / "tmpk3x_9a2q").write_bytes(b"")
    (models / f".checkpoint_iteration={restart_from + CKPT_INTERVAL}.pt.a1b2c3d4.tmp").write_bytes(b"PK\x03")
    _run(data, resumed, resume=True)

    # The episode stream: the resumed run trains iterations restart_from+1..30 on the uninterrupted run's episodes.
    expected = _stream(reference)
    assert sorted(expected) == list(range(1, ITERATIONS + 1))
    assert len({tuple(v) for v in expected.values()}) == ITERATIONS, "iterations must see different episodes"
    lines = _stream_lines(resumed)
    assert lines == list(range(1, killed_at + 1)) + list(range(restart_from + 1, ITERATIONS + 1))
    # Every iteration that wrote its line saw the uninterrupted run's episodes (the one the kill may have cut off
    # between its checkpoint and its line, restart_from, was trained and saved but left no line).
    assert _stream(resumed) == {i: expected[i] for i in lines}

    # Iteration and optimizer state of the final checkpoints.
    final_ref = _checkpoint(reference / "models" / f"checkpoint_iteration={ITERATIONS}.pt")
    final_res = _checkpoint(models / f"checkpoint_iteration={ITERATIONS}.pt")
    assert final_res["trainer"]["iteration"] == final_ref["trainer"]["iteration"] == ITERATIONS
    opt_ref, opt_res = final_ref["optimizer"], final_res["optimizer"]
    assert opt_ref["param_groups"] == opt_res["param_groups"]
    assert opt_ref["state"].keys() == opt_res["state"].keys() and opt_ref["state"]
    for key, state in opt_ref["state"].items():
        assert int(state["step"]) == int(opt_res["state"][key]["step"]) == ITERATIONS
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_res["state"][key][name], state[name], rtol=1e-4, atol=1e-7)
    for name, value in final_ref["model"].items():
        torch.testing.assert_close(final_res["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)

    # The folder: no temporary files, and n_saved=2 interval checkpoints across the two runs, as uninterrupted.
    assert sorted(p.name for p in models.iterdir()) == sorted(p.name for p in (reference / "models").iterdir())


def _saving_engine(folder: Path, iterations: int, resume: bool = False):
    from ignite.engine import Engine

    from monai_sdfsmis.engines import AtomicCheckpointSaver, ResumeFromCheckpoint

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(lambda engine, batch: None)
    if resume:
        ResumeFromCheckpoint(folder, {"model": model, "optimizer": optimizer}).attach(engine)
    AtomicCheckpointSaver(str(folder), {"model": model, "optimizer": optimizer}, engine_key="trainer", rng_key="rng",
                          epoch_level=False, save_interval=5, n_saved=2).attach(engine)
    return engine, range(iterations)


def test_a_fresh_run_in_a_folder_of_another_run_saves_and_leaves_the_old_files(tmp_path):
    engine, data = _saving_engine(tmp_path, 30)
    engine.run(data, max_epochs=1)
    old = sorted(p.name for p in tmp_path.iterdir())
    assert old == ["checkpoint_iteration=25.pt", "checkpoint_iteration=30.pt"]
    (tmp_path / "tmpa1b2c3d4").write_bytes(b"")  # ignite's name for an interrupted atomic write
    engine, data = _saving_engine(tmp_path, 10)
    engine.run(data, max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_iteration=10.pt", "checkpoint_iteration=25.pt", "checkpoint_iteration=30.pt",
        "checkpoint_iteration=5.pt",
    ]


def test_a_resumed_run_rotates_the_checkpoints_of_the_run_it_resumes(tmp_path):
    from ignite.engine import Events

    engine, data = _saving_engine(tmp_path, 30)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=15), lambda engine: engine.terminate())  # a crash
    engine.run(data, max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_iteration=10.pt", "checkpoint_iteration=15.pt"]
    engine, data = _saving_engine(tmp_path, 30, resume=True)
    engine.run(data, max_epochs=1)
    assert engine.state.iteration == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_iteration=25.pt", "checkpoint_iteration=30.pt"]
    assert set(_checkpoint(tmp_path / "checkpoint_iteration=30.pt")) == {"model", "optimizer", "trainer", "rng"}


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    from ignite.engine import Engine, Events

    from monai_sdfsmis.engines import ResumeFromCheckpoint

    engine, data = _saving_engine(tmp_path, 30)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=15), lambda engine: engine.terminate())  # a crash
    engine.run(data, max_epochs=1)
    newest = tmp_path / "checkpoint_iteration=15.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a full disk cut it short

    model = torch.nn.Linear(2, 1)
    resume = ResumeFromCheckpoint(tmp_path, {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)})
    started = []
    engine = Engine(lambda engine, batch: None)
    resume.attach(engine)
    engine.add_event_handler(Events.STARTED, lambda engine: started.append(engine.state.iteration))
    with pytest.warns(UserWarning, match=r"cannot resume from .*checkpoint_iteration=15.pt: .*trying an older"):
        engine.run(range(30), max_epochs=1)
    assert resume.loaded_from == tmp_path / "checkpoint_iteration=10.pt" and started == [10]
    assert engine.state.iteration == 30


def test_resume_refuses_in_one_line_when_no_checkpoint_fits(tmp_path):
    from ignite.engine import Engine

    from monai_sdfsmis.engines import ResumeFromCheckpoint

    engine, data = _saving_engine(tmp_path, 10)
    engine.run(data, max_epochs=1)
    other = torch.nn.Linear(3, 1)  # another architecture: every checkpoint's weights have the wrong shape
    resume = ResumeFromCheckpoint(tmp_path, {"model": other, "optimizer": torch.optim.SGD(other.parameters(), lr=0.1)})
    engine = Engine(lambda engine, batch: None)
    resume.attach(engine)
    with pytest.warns(UserWarning), pytest.raises(ValueError) as error:
        engine.run(range(10), max_epochs=1)
    message = str(error.value)
    assert message.startswith(f"no checkpoint in {tmp_path} can be resumed from: checkpoint_iteration=10.pt (")
    assert "checkpoint_iteration=5.pt (" in message and "size mismatch" in message and "\n" not in message


def _interrupted_at(folder: Path, at: int | None, iterations: int = 30) -> None:
    from ignite.engine import Events

    engine, data = _saving_engine(folder, iterations)
    if at is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=at), lambda engine: engine.terminate())  # a crash
    engine.run(data, max_epochs=1)


@pytest.mark.parametrize("killed_at, planned", [(15, 20), (None, 50), (15, 45)])
def test_a_resume_trains_to_the_iterations_it_plans_not_the_interrupted_runs(tmp_path, killed_at, planned):
    """Shorten an interrupted run, extend a finished one: the resumed run stops at its own planned iteration."""
    from ignite.engine import Events

    _interrupted_at(tmp_path, killed_at)
    start = 30 if killed_at is None else killed_at
    engine, data = _saving_engine(tmp_path, planned, resume=True)
    trained: list[int] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: trained.append(engine.state.iteration))
    engine.run(data, max_epochs=1)
    assert trained == list(range(start + 1, planned + 1))
    assert (tmp_path / f"checkpoint_iteration={planned}.pt").is_file()


def test_a_resume_planning_fewer_iterations_than_done_is_refused_in_one_line(tmp_path):
    _interrupted_at(tmp_path, 15)
    engine, data = _saving_engine(tmp_path, 10, resume=True)
    with pytest.raises(ValueError) as error:
        engine.run(data, max_epochs=1)
    message = str(error.value)
    assert message == (f"checkpoint {tmp_path / 'checkpoint_iteration=15.pt'} is at iteration 15, beyond the 10 "
                       "iterations this run plans; plan at least 15 iterations to resume from it, or start afresh in "
                       "a new ckpt_dir")
