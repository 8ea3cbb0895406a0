"""RunLog: JSON lines always; TensorBoard scalars when torch.utils.tensorboard imports (the optional
`fastmini[tensorboard]` extra, not installed for the tests, so a stand-in module plays the writer)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from fastmini.training.run_log import LOG_NAME, TENSORBOARD_DIR, RunLog


class FakeSummaryWriter:
    """Records what RunLog asks of torch.utils.tensorboard.SummaryWriter."""

    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir = log_dir
        self.purge_step = purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        assert not self.closed, "a scalar written after close() would be lost"
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    """A torch.utils.tensorboard stand-in: `from torch.utils.tensorboard import SummaryWriter` finds it."""
    FakeSummaryWriter.instances = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeSummaryWriter.instances


@pytest.fixture
def no_tensorboard(monkeypatch):
    """As without the extra: the import fails (None in sys.modules makes `import` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def records(directory):
    return [json.loads(line) for line in (directory / LOG_NAME).read_text().splitlines()]


def test_tensorboard_gets_every_numeric_value_as_kind_slash_key_at_its_step_and_is_closed(tmp_path, fake_tensorboard):
    run_log = RunLog(tmp_path, enabled=True)
    assert len(fake_tensorboard) == 1 and fake_tensorboard[0].log_dir == str(tmp_path / TENSORBOARD_DIR)
    run_log.write("train", 10, {"loss": 2.5, "lr": 1e-4, "tokens": 512})
    run_log.write("train", 20, {"loss": 2.0, "lr": 5e-5, "tokens": 512})
    # booleans, text and nested dicts are not scalars for TensorBoard
    run_log.write("eval", 20, {"accuracy": 0.75, "improved": True, "mode": "full", "after": {"loss": 1.0}})
    writer = fake_tensorboard[0]
    assert writer.scalars == [
        ("train/loss", 2.5, 10), ("train/lr", 1e-4, 10), ("train/tokens", 512, 10),
        ("train/loss", 2.0, 20), ("train/lr", 5e-5, 20), ("train/tokens", 512, 20),
        ("eval/accuracy", 0.75, 20),
    ]  # fmt: skip
    assert not writer.closed
    run_log.close()
    assert writer.closed  # events are flushed to disk


def test_json_lines_hold_kind_step_and_values_with_non_finite_numbers_as_text(tmp_path, no_tensorboard):
    run_log = RunLog(tmp_path / "new" / "dir", enabled=True)  # the directory is created
    run_log.write("train", 1, {"loss": 3.0, "grad_norm": float("nan"), "scale": float("inf")})
    run_log.write("eval", 2, {"after": {"loss": 1.5}})
    run_log.close()  # without TensorBoard close is a no-op
    assert records(tmp_path / "new" / "dir") == [
        {"kind": "train", "step": 1, "loss": 3.0, "grad_norm": "nan", "scale": "inf"},  # JSON has no NaN/inf
        {"kind": "eval", "step": 2, "after": {"loss": 1.5}},
    ]
    assert not (tmp_path / "new" / "dir" / TENSORBOARD_DIR).exists()


def test_a_new_run_starts_an_empty_log_and_a_resumed_one_drops_lines_after_its_checkpoint(tmp_path, no_tensorboard):
    (tmp_path / LOG_NAME).write_text('{"kind": "train", "step": 5}\n')
    RunLog(tmp_path, enabled=True)
    assert (tmp_path / LOG_NAME).read_text() == ""  # a fresh run does not append to an old run's log
    lines = [{"kind": "train", "step": s} for s in (5, 10, 15)]
    (tmp_path / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra')  # cut short
    resumed = RunLog(tmp_path, enabled=True, resume_from_step=10)
    resumed.write("train", 15, {"loss": 1.0})
    assert records(tmp_path) == lines[:2] + [{"kind": "train", "step": 15, "loss": 1.0}]


def test_tensorboard_events_tell_one_run_as_the_json_lines_do(tmp_path, fake_tensorboard):
    """A new run's curves did not replace the old run's (events kept piling up in tensorboard/), and a resumed run
    showed the interrupted process's steps after the checkpoint twice."""
    events = tmp_path / TENSORBOARD_DIR
    events.mkdir()
    (events / "events.out.earlier").write_text("an earlier run's")
    RunLog(tmp_path, enabled=True)
    assert not events.exists() and fake_tensorboard[-1].purge_step is None
    events.mkdir()
    (events / "events.out.interrupted").write_text("this run's, before it was stopped")
    RunLog(tmp_path, enabled=True, resume_from_step=10)
    assert (events / "events.out.interrupted").exists() and fake_tensorboard[-1].purge_step == 11
    source = tmp_path / "source"
    source.mkdir()
    (source / LOG_NAME).write_text('{"kind": "train", "step": 5}\n')
    RunLog(tmp_path, enabled=True, resume_from_step=5, resumed_run=source)  # another directory's run
    assert not events.exists() and fake_tensorboard[-1].purge_step is None


def test_a_disabled_log_on_ranks_after_the_first_creates_no_writer_and_writes_nothing(tmp_path, fake_tensorboard):
    directory = tmp_path / "out"
    run_log = RunLog(directory, enabled=False, resume_from_step=3)
    run_log.write("train", 1, {"loss": 1.0})
    run_log.close()
    assert fake_tensorboard == [] and not directory.exists()
