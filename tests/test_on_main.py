"""training.distributed.on_main: what rank 0 does alone, and how the other ranks learn that it failed.

Without a process group here, the broadcast is replaced by one that records what rank 0 sends and hands another
rank what a rank 0 sent (the two-process runs: tests/test_finetune_ddp.py, tests/test_distill_ddp.py)."""

from __future__ import annotations

import pytest
import torch

from fastmini.training import distributed
from fastmini.training.distributed import DistributedContext, on_main
from fastmini.training.errors import TrainingError, UsageError

RANK_0, RANK_1 = (DistributedContext(rank, 2, rank, torch.device("cpu")) for rank in (0, 1))


@pytest.fixture
def sent(monkeypatch):
    """What rank 0 broadcast; on rank 1 the broadcast returns ``sent[0]`` (set it to play rank 0's part)."""
    messages = []

    def broadcast(value, context):
        if context.is_main:
            messages.append(value)
            return value
        return messages[0]

    monkeypatch.setattr(distributed, "broadcast_from_main", broadcast)
    return messages


def test_in_one_process_it_is_the_work_itself():
    assert on_main(DistributedContext(0, 1, 0, torch.device("cpu")), lambda: 7) == 7


def test_rank_0_works_and_shares_its_result_only_when_asked(sent):
    assert on_main(RANK_0, lambda: {"f1": 0.5}, share_result=True) == {"f1": 0.5}
    assert on_main(RANK_1, lambda: pytest.fail("rank 1 ran rank 0's work"), share_result=True) == {"f1": 0.5}
    sent.clear()
    assert on_main(RANK_0, lambda: 3) == 3 and sent == [(None, None)]  # not shared: nothing sent but the outcome
    assert on_main(RANK_1, lambda: 3) is None


@pytest.mark.parametrize(
    "error, seen_elsewhere",
    [(UsageError("--output-dir x: another fastmini job is running in it"), UsageError),
     (OSError(28, "No space left on device"), TrainingError),
     (SystemExit(3), TrainingError)],
    ids=["usage", "os-error", "exit"],
)  # fmt: skip
def test_a_failure_on_rank_0_is_raised_there_and_told_to_the_others(sent, error, seen_elsewhere):
    def work():
        raise error

    with pytest.raises(type(error)) as raised:
        on_main(RANK_0, work)
    assert raised.value is error
    with pytest.raises(seen_elsewhere) as elsewhere:
        on_main(RANK_1, work)
    if seen_elsewhere is UsageError:
        assert str(elsewhere.value) == str(error)  # the same sentence, printed by rank 0 alone
    if seen_elsewhere is TrainingError:
        assert "rank 0 failed" in str(elsewhere.value) and not elsewhere.value.rank_specific


def test_a_result_that_cannot_be_shared_fails_where_the_others_can_be_told(sent):
    with pytest.raises(Exception, match="pickle"):
        on_main(RANK_0, lambda: lambda: None, share_result=True)
    with pytest.raises(TrainingError, match="rank 0 failed"):
        on_main(RANK_1, lambda: None, share_result=True)


def test_an_interrupt_on_rank_0_is_not_broadcast(sent):
    """Ctrl-C reaches every rank by itself: the others may be gone already, and a broadcast to them failed with a
    gloo traceback in place of the "interrupted" line."""

    def work():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        on_main(RANK_0, work)
    assert sent == []


def test_rank_0s_error_stands_when_the_others_are_gone(monkeypatch):
    def broadcast(value, context):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(distributed, "broadcast_from_main", broadcast)
    with pytest.raises(UsageError, match="the one to report"):
        on_main(RANK_0, lambda: (_ for _ in ()).throw(UsageError("the one to report")))


def test_a_rank_whose_rank_0_went_without_a_word_stops_with_one_line(monkeypatch):
    def broadcast(value, context):
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:8360. This is typically caused by")

    monkeypatch.setattr(distributed, "broadcast_from_main", broadcast)
    with pytest.raises(TrainingError, match="rank 0 stopped while this rank waited") as raised:
        on_main(RANK_1, lambda: None)
    assert raised.value.rank_specific  # printed by this rank, named


def test_rank_0s_error_keeps_its_chain_when_the_others_are_gone(monkeypatch):
    def broadcast(value, context):
        raise RuntimeError("Connection closed by peer")

    def work():
        try:
            raise OSError(28, "No space left on device")
        except OSError as cause:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from cause

    monkeypatch.setattr(distributed, "broadcast_from_main", broadcast)
    with pytest.raises(RuntimeError, match="PytorchStreamWriter") as raised:
        on_main(RANK_0, work)
    assert isinstance(raised.value.__cause__, OSError)  # still recognisable as a full disk (training.write_failures)
