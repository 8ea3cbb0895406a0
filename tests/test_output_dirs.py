"""fastmini.training.output_dirs: a trainer replaces only its own earlier run, one job in a directory at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from fastmini.training import output_dirs
from fastmini.training.errors import UsageError
from fastmini.training.output_dirs import (
    LOCK_NAME,
    check_foreign_outputs,
    check_not_running,
    hold_output_dir,
    release_output_dir,
    releasing_output_dirs_taken,
    written_by,
)


def saved(directory, train_config=None, **files):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    if train_config is not None:
        (directory / "train_config.json").write_text(json.dumps(train_config))
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_the_writer_of_a_directory_is_told_by_its_train_config(tmp_path):
    assert written_by(tmp_path / "absent") is None
    assert written_by(tmp_path) is None  # empty
    (tmp_path / "log.jsonl").write_text("")  # an unfinished distillation's leftovers hold no model
    assert written_by(tmp_path) is None
    assert written_by(saved(tmp_path / "d", {"teacher": "t", "seed": 1})) == "fastmini.distill"
    assert written_by(saved(tmp_path / "f", {"task": "sst2", "seed": [1]})) == "fastmini.finetune"
    assert written_by(saved(tmp_path / "hand")) == ""  # model.save_pretrained by hand
    (tmp_path / "job" / "runs").mkdir(parents=True)  # a fine-tuning job stopped before it published
    assert written_by(tmp_path / "job") == "fastmini.finetune"


def test_another_writers_outputs_are_kept_unless_overwriting_and_inputs_always(tmp_path):
    distilled = saved(tmp_path / "distilled", {"teacher": "t"})
    check_foreign_outputs(distilled, "fastmini.distill", False, {})  # its own run: replaced as before
    with pytest.raises(UsageError, match=r"holds a fastmini.distill run's outputs; pass --overwrite-output-dir"):
        check_foreign_outputs(distilled, "fastmini.finetune", False, {})
    check_foreign_outputs(distilled, "fastmini.finetune", True, {})
    by_hand = saved(tmp_path / "by_hand")
    with pytest.raises(UsageError, match="a model or files that no fastmini trainer wrote"):
        check_foreign_outputs(by_hand, "fastmini.distill", False, {"--teacher": "bert-base-uncased"})
    (tmp_path / "x").mkdir()
    same = {"--model": str(tmp_path / "x" / ".." / "distilled")}  # another spelling of the output directory
    for overwrite in (False, True):  # even --overwrite-output-dir never writes over the run's input
        with pytest.raises(UsageError, match=r"is the --model directory: the run would overwrite its own input"):
            check_foreign_outputs(distilled, "fastmini.finetune", overwrite, same)


def test_one_process_holds_a_directory_and_a_second_is_refused(tmp_path):
    hold_output_dir(tmp_path)
    hold_output_dir(tmp_path)  # the same process again: a no-op
    assert (tmp_path / LOCK_NAME).read_text().strip().isdigit()
    probe = (
        "import sys\nfrom pathlib import Path\nfrom fastmini.training.output_dirs import check_not_running, "
        "hold_output_dir\nfrom fastmini.training.errors import UsageError\n"
        "for check in (check_not_running, hold_output_dir):\n"
        "    try:\n        check(Path(sys.argv[1]))\n        print('free')\n"
        "    except UsageError as error:\n        print(error)\n"
    )

    def other_process() -> list[str]:
        run = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=120)
        return run.stdout.splitlines()

    refused = other_process()
    assert len(refused) == 2 and all("another fastmini job is running in it (process " in line for line in refused)
    release_output_dir(tmp_path)
    assert other_process() == ["free", "free"]  # and the lock dies with that process
    check_not_running(tmp_path)


def test_a_job_gives_back_the_lock_it_took_even_after_the_working_directory_changed(tmp_path, monkeypatch):
    (tmp_path / "a" / "out").mkdir(parents=True)
    (tmp_path / "b" / "out").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    with releasing_output_dirs_taken():
        hold_output_dir(Path("out"))
        monkeypatch.chdir(tmp_path / "b")  # "out" now names another directory
    assert (tmp_path / "a" / "out").resolve() not in output_dirs._held
    check_not_running(tmp_path / "a" / "out")  # free: a second job may start there


def test_a_job_gives_back_only_the_locks_it_took_not_another_threads(tmp_path):
    import threading

    b_holds, a_ended = threading.Event(), threading.Event()

    def job_b() -> None:
        with releasing_output_dirs_taken():
            hold_output_dir(tmp_path / "b")
            b_holds.set()
            a_ended.wait(timeout=60)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with releasing_output_dirs_taken():
        hold_output_dir(tmp_path / "a")
        thread = threading.Thread(target=job_b)
        thread.start()
        assert b_holds.wait(timeout=60)
    held = set(output_dirs._held)
    a_ended.set()
    thread.join(timeout=60)
    assert (tmp_path / "b").resolve() in held and (tmp_path / "a").resolve() not in held
    assert (tmp_path / "b").resolve() not in output_dirs._held  # and b's own job gave it back


def test_a_publication_stopped_part_way_still_names_its_writer(tmp_path, monkeypatch):
    """train_config.json goes first: a config.json without it reads as another tool's model, and the run's own
    checkpoints could then be neither resumed nor replaced without --overwrite-output-dir."""
    from fastmini.training.checkpoints import publish_directory_contents

    staging = tmp_path / ".tmp-final"
    staging.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (staging / name).write_text("{}")
    (staging / "train_config.json").write_text(json.dumps({"teacher": "t"}))
    renames = []
    replace = Path.replace

    def stopped_after_two(self, target):
        if len(renames) == 2:
            raise KeyboardInterrupt
        renames.append(self.name)
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        publish_directory_contents(staging, tmp_path / "out")
    assert renames == ["train_config.json", "config.json"]
    assert written_by(tmp_path / "out") == "fastmini.distill"


def test_publishing_replaces_a_file_in_one_rename(tmp_path, monkeypatch):
    """A file of the same name is replaced by the rename itself: removed first, a stop between the two would leave
    the directory without it (config.json without train_config.json reads as another tool's model)."""
    from fastmini.training import checkpoints

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_config.json").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "train_config.json").write_text("new")
    removed = []
    monkeypatch.setattr(checkpoints, "remove_entry", removed.append)
    checkpoints.publish_directory_contents(tmp_path / "new", tmp_path / "out")
    assert removed == [] and (tmp_path / "out" / "train_config.json").read_text() == "new"


def test_a_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from fastmini.training.output_dirs import "
         "hold_output_dir; hold_output_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"process {holder.pid}"):
            check_not_running(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            check_not_running(tmp_path)
            break
        except UsageError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_filesystem_without_locks_runs_the_job_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="cannot lock it \\(No locks available\\)"):
        hold_output_dir(tmp_path)
    release_output_dir(tmp_path)  # nothing held: a no-op


def test_a_platform_without_flock_runs_the_job_with_a_warning(tmp_path, monkeypatch):
    """Windows has no fcntl: both trainers failed there with ModuleNotFoundError before their first step."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl -> ImportError
    with pytest.warns(RuntimeWarning, match="cannot lock it \\(this platform has no flock\\)"):
        hold_output_dir(tmp_path)
    release_output_dir(tmp_path)


@pytest.mark.parametrize("reason", ["this platform has no flock", "No locks available"])
def test_without_locks_a_job_warns_once(tmp_path, monkeypatch, reason):
    """The lock file a first job left made check_not_running warn too: every later job warned twice."""
    import errno

    if reason == "No locks available":
        import fcntl

        def no_locks(handle, operation):
            raise OSError(errno.ENOLCK, reason)

        monkeypatch.setattr(fcntl, "flock", no_locks)
    else:
        monkeypatch.setitem(sys.modules, "fcntl", None)
    (tmp_path / LOCK_NAME).write_text("123\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_not_running(tmp_path)
        hold_output_dir(tmp_path)
    assert [str(w.message) for w in caught] == [
        f"--output-dir {tmp_path}: cannot lock it ({reason}); a second job started there now would not be refused"
    ]


@pytest.mark.parametrize("trainer", ["distill", "finetune"])
def test_only_the_process_that_holds_the_lock_probes_it(trainer, tmp_path):
    """The ranks of one DDP job all probed the lock at start: two probing at once took each other for another job
    (a flaky 'another fastmini job is running in it' under load); the trainers pass probe_lock=context.is_main."""
    import importlib

    module = importlib.import_module(f"fastmini.{trainer}.trainer")
    config_class = module.DistillConfig if trainer == "distill" else module.FinetuneConfig
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from fastmini.training.output_dirs import hold_output_dir\n"
         "hold_output_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        config = config_class(output_dir=str(tmp_path))
        with pytest.raises(UsageError, match="another fastmini job is running in it"):
            module.check_output_dir(config)
        assert module.check_output_dir(config, probe_lock=False) == tmp_path  # another rank of the holder's job
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("trainer", ["distill", "finetune"])
def test_the_trainers_probe_the_lock_on_the_main_process_only(trainer, tmp_path, monkeypatch):
    import importlib

    import torch

    from fastmini.training import distributed
    from fastmini.training.distributed import DistributedContext

    module = importlib.import_module(f"fastmini.{trainer}.trainer")
    config_class, run_class = (
        (module.DistillConfig, module.DistillationRun) if trainer == "distill" else (module.FinetuneConfig,
                                                                                       module.FineTuning)
    )  # fmt: skip
    probed = []

    def check_output_dir(config, probe_lock=True):
        probed.append(probe_lock)
        raise UsageError("stop here")

    monkeypatch.setattr(module, "check_output_dir", check_output_dir)
    # No process group here: each rank sees its own value as rank 0's (rank 1 as though rank 0's checks passed).
    monkeypatch.setattr(distributed, "broadcast_from_main", lambda value, context: value)
    for rank in (0, 1):
        with pytest.raises(UsageError, match="stop here"):
            run_class(config_class(output_dir=str(tmp_path)), DistributedContext(rank, 2, rank, torch.device("cpu")))
    assert probed == [True, False]
