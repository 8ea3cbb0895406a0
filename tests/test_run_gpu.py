"""benchmarks/run_gpu.py (`make bench-gpu`) without a GPU: the Markdown it writes and the time budget
that makes it come back within one device call with what finished."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

RUN_GPU = Path(__file__).resolve().parent.parent / "benchmarks" / "run_gpu.py"


@pytest.fixture(scope="module")
def run_gpu():
    spec = importlib.util.spec_from_file_location("run_gpu", RUN_GPU)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_texts_stay_inside_their_table_cell(run_gpu):
    report = {
        "benchmarks": [
            {
                "name": "test_latency_1x128",
                "stats": {"median": 0.00025},
                "extra_info": {
                    "error": "RuntimeError: capture failed\nA | B\r\n  at line 3",
                    "unavailable": {"fastmini-graphed-l2": "ValueError: a|b"},  # written as a dict's repr
                    "device": "left out",
                },
            }
        ]
    }
    header, rule, row = run_gpu.benchmark_rows(report)
    assert "\n" not in row and "\r" not in row
    unescaped = row.replace("\\|", "")
    assert unescaped.count("|") == header.count("|") == 5  # four cells, whatever the error said
    assert "error: RuntimeError: capture failed A \\| B at line 3;" in row and "ValueError: a\\|b" in row
    assert "left out" not in row
    assert run_gpu.markdown_cell("a|b\nc") == "a\\|b c"


def test_a_step_past_its_budget_is_interrupted_and_its_reports_kept(run_gpu, tmp_path):
    """SIGINT first: the program (pytest) ends cleanly and writes what it has; the log says so."""
    done = tmp_path / "written-on-interrupt"
    program = (
        "import time, pathlib\n"
        "try:\n    time.sleep(60)\n"
        f"except KeyboardInterrupt:\n    pathlib.Path({str(done)!r}).write_text('partial')\n    raise SystemExit(2)\n"
    )
    # Margins for a loaded machine: the child's start-up must be over when the interrupt comes (at 6 s).
    code, output = run_gpu.run_within([sys.executable, "-c", program], tmp_path / "step.log", budget_s=10, grace_s=4)
    assert code == 2 and done.read_text() == "partial"  # interrupted in its sleep, not after it
    assert "stopped at its 10 s budget (interrupted)" in output
    assert run_gpu.summary_line("1 passed, 2 skipped in 3s\n" + output).endswith("(interrupted)")


def test_a_step_is_interruptible_even_when_started_with_sigint_ignored(run_gpu, tmp_path):
    """A shell without job control starts background commands with SIGINT ignored, and children inherit that:
    the step must get it back, or pytest would never end cleanly at the budget."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `make bench-gpu &` from a script would be
    try:
        program = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
        code, output = run_gpu.run_within([sys.executable, "-c", program], tmp_path / "step.log", budget_s=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 0 and output.startswith("True"), output


def test_what_a_finished_step_left_running_goes_with_it(run_gpu, tmp_path, gone):
    """A compile worker or a profiled process left behind would hold a CUDA context into the next step."""
    child_pid = tmp_path / "child.pid"
    program = (
        "import subprocess, sys, pathlib\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"pathlib.Path({str(child_pid)!r}).write_text(str(child.pid))\n"
    )
    code, _output = run_gpu.run_within([sys.executable, "-c", program], tmp_path / "step.log", budget_s=30)
    assert code == 0 and gone(int(child_pid.read_text()))


def test_a_step_that_ignores_the_interrupt_is_killed(run_gpu, tmp_path):
    program = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('started', flush=True); "
        "time.sleep(60)"
    )
    code, output = run_gpu.run_within([sys.executable, "-c", program], tmp_path / "step.log", budget_s=8, grace_s=3)
    assert code != 0 and "started" in output and "(killed)" in output  # a sleep to its end would exit 0


# A benchmark file's head: a fast benchmark, then interrupt() sends the process the SIGINT of run_within's budget.
INTERRUPTS_ITSELF = (
    "import os, signal\n"
    "def interrupt():\n    os.kill(os.getpid(), signal.SIGINT)\n"
    "def test_fast(benchmark):\n    benchmark.pedantic(lambda: None, rounds=3)\n"
)


def test_interrupted_benchmarks_still_write_their_json(run_gpu, tmp_path):
    """What the budget relies on: pytest-benchmark saves --benchmark-json at the end of an interrupted session.
    The slow test sends itself the SIGINT that run_within's budget sends (test_a_step_past_its_budget_... checks
    that it does), so the test need not wait out a budget long enough for pytest to start on a loaded machine."""
    (tmp_path / "test_slow.py").write_text(INTERRUPTS_ITSELF + "def test_slow(benchmark):\n    interrupt()\n")
    report = tmp_path / "bench.json"
    code, output = run_gpu.run_within(
        [*run_gpu.pytest_command(), str(tmp_path / "test_slow.py"), "-q", "-p", "no:cacheprovider",
         f"--rootdir={tmp_path}", f"--benchmark-json={report}"],
        tmp_path / "bench.log",
        budget_s=120,  # not reached: the test interrupts itself
    )  # fmt: skip
    assert "KeyboardInterrupt" in output and "(interrupted)" not in output, output
    assert [bench["name"] for bench in json.loads(report.read_text())["benchmarks"]] == ["test_fast"]


BENCHMARKS_CONFTEST = RUN_GPU.parent / "conftest.py"


def write_benchmarks(directory: Path, source: str, name: str = "test_some.py") -> Path:
    """A benchmark file beside a copy of benchmarks/conftest.py (its hooks apply as they do there)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "conftest.py").write_text(BENCHMARKS_CONFTEST.read_text())
    path = directory / name
    path.write_text(source)
    return path


def test_a_benchmark_stopped_in_its_warm_up_does_not_lose_the_others(run_gpu, tmp_path):
    """pytest-benchmark cannot summarise a benchmark with no timed round and then writes no JSON at all;
    benchmarks/conftest.py drops such a benchmark first (a Triton compile in a warm-up takes seconds)."""
    path = write_benchmarks(
        tmp_path / "bench",
        INTERRUPTS_ITSELF + "def test_stopped_in_warm_up(benchmark):\n"
        "    benchmark.pedantic(interrupt, rounds=1, warmup_rounds=1)\n",
    )
    report = tmp_path / "bench.json"
    code, output = run_gpu.run_within(
        [*run_gpu.pytest_command(), str(path), "-q", "-p", "no:cacheprovider", f"--rootdir={path.parent}",
         f"--benchmark-json={report}"],
        tmp_path / "bench.log",
        budget_s=120,  # not reached: the warm-up interrupts itself, as the budget's SIGINT would
    )  # fmt: skip
    assert "KeyboardInterrupt" in output and "(interrupted)" not in output, output
    assert [bench["name"] for bench in run_gpu.read_report(report)["benchmarks"]] == ["test_fast"]


def test_gpu_tests_run_the_quick_feature_gates_first_and_every_marked_file(run_gpu):
    files = run_gpu.gpu_test_files()
    assert files[: len(run_gpu.GPU_TESTS_FIRST)] == run_gpu.GPU_TESTS_FIRST
    root = RUN_GPU.parent.parent
    marked = {f"tests/{p.name}" for p in (root / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()}
    assert set(files) == marked and len(files) == len(marked)
    assert "tests/test_adapter_bottleneck_kernel.py" in files


def test_failed_tests_are_named_from_the_short_summary(run_gpu):
    output = (
        "..F.\n------------------------------ Captured log call -------------------------------\n"
        "ERROR    fastmini.runtime:capture.py:3 capture fell back to eager\n"
        "=========================== short test summary info ============================\n"
        "FAILED tests/test_a.py::test_x - AssertionError: off\nERROR tests/test_b.py::test_y\n"
        "ERROR collecting tests/test_c.py - ImportError\n"
        "1 failed, 2 passed, 1 error in 3.0s\n"
    )
    assert run_gpu.failed_tests(output) == [
        "FAILED tests/test_a.py::test_x - AssertionError: off",
        "ERROR tests/test_b.py::test_y",
        "ERROR collecting tests/test_c.py - ImportError",
    ]
    assert run_gpu.failed_tests("4 passed in 1.0s\n") == []


def test_a_subset_of_benchmarks_and_a_label_are_checked(run_gpu, capsys):
    arguments = run_gpu.parse_arguments([])
    assert arguments.benchmarks == run_gpu.GPU_BENCHMARKS and arguments.label is None
    arguments = run_gpu.parse_arguments(["--label", "encoder", "benchmarks/test_encoder_forward_gpu.py"])
    assert arguments.benchmarks == ["benchmarks/test_encoder_forward_gpu.py"] and arguments.label == "encoder"
    assert arguments.tests is None
    arguments = run_gpu.parse_arguments(["benchmarks/test_distill_step.py", "--tests", "tests/test_run_gpu.py"])
    assert arguments.benchmarks == ["benchmarks/test_distill_step.py"]
    assert arguments.tests == ["tests/test_run_gpu.py"]
    arguments = run_gpu.parse_arguments(["--no-tests", "--no-launch-overhead"])
    assert arguments.no_tests and arguments.no_launch_overhead and arguments.tests is None
    assert not run_gpu.parse_arguments([]).no_tests and not run_gpu.parse_arguments([]).no_launch_overhead
    one_test = "benchmarks/test_distill_step.py::test_distillation_step_compiled_graphs"
    assert run_gpu.parse_arguments([one_test]).benchmarks == [one_test]  # a test of a file, in a pytest of its own
    for bad, message in (
        (["benchmarks/missing.py"], "no such file: benchmarks/missing.py"),
        (["benchmarks/missing.py::test_x"], "no such file: benchmarks/missing.py::test_x"),
        (["--tests", "tests/missing.py"], "no such file: tests/missing.py"),
        (["--label", "a/b"], "--label"),
        (["--no-tests", "--tests", "tests/test_run_gpu.py"], "--tests names GPU tests to run, --no-tests runs none"),
        # --tests takes every name after it: a benchmark file there would run as a test
        (["--tests", "tests/test_run_gpu.py", "benchmarks/test_add_layer_norm.py"], "test files go after --tests"),
    ):
        with pytest.raises(SystemExit):
            run_gpu.parse_arguments(bad)
        assert message in capsys.readouterr().err


def test_when_time_is_short_the_last_steps_go_unrun_not_the_first(run_gpu, tmp_path):
    reserve = run_gpu.BENCHMARK_FILE_RESERVE_S
    assert run_gpu.step_budget(1000, 3) == 1000 - 3 * reserve  # room for all: a reserve for each later step
    assert run_gpu.step_budget(2.5 * reserve, 6) == 1.5 * reserve  # room for this and one more
    assert run_gpu.step_budget(0.9 * reserve, 6) == 0.9 * reserve  # room for this one only
    assert run_gpu.tests_share(510) == run_gpu.TESTS_SHARE_S and run_gpu.tests_share(170) < 80  # a small budget
    assert run_gpu.unused_name(tmp_path, "day-gpu-x").name == "day-gpu-x.md"
    (tmp_path / "day-gpu-x.md").write_text("the first call's")
    (tmp_path / "day-gpu-x-2.md").write_text("the second call's")
    assert run_gpu.unused_name(tmp_path, "day-gpu-x").name == "day-gpu-x-3.md"  # never over an earlier call's


def test_pytest_endings_without_passes_are_summarised(run_gpu):
    assert run_gpu.summary_line("==== 14 deselected in 0.04s ====") == "14 deselected in 0.04s"
    assert run_gpu.summary_line("==== no tests ran in 0.43s ====") == "no tests ran in 0.43s"
    missing = "ERROR: not found: /r/benchmarks/x.py::test_nope\n(no match in any of [<Module x.py>])\n"
    assert "ERROR: not found: /r/benchmarks/x.py::test_nope" in run_gpu.summary_line(missing + "no tests ran in 0.1s")
    code, output = run_gpu.without_no_tests_failure(5, "14 deselected in 0.04s\n")
    assert code == 0 and run_gpu.summary_line(output) == "no gpu-marked tests in the files named (pytest exit 5)"
    assert run_gpu.without_no_tests_failure(1, "1 failed")[0] == 1


def test_tests_of_one_file_named_in_a_row_share_a_pytest(run_gpu, tmp_path):
    distill, kernels = "benchmarks/test_distill_step.py", "benchmarks/test_add_layer_norm.py"
    assert run_gpu.benchmark_steps(
        [f"{distill}::test_a", f"{distill}::test_b", kernels, f"{kernels}::test_c", f"{distill}::test_d", distill]
    ) == [[f"{distill}::test_a", f"{distill}::test_b"], [kernels], [f"{kernels}::test_c"], [f"{distill}::test_d"],
          [distill]]  # fmt: skip
    timed = "    benchmark.pedantic(lambda: None, rounds=2)\n"
    both = write_benchmarks(tmp_path, f"def test_one(benchmark):\n{timed}\ndef test_two(benchmark):\n{timed}")
    logs = tmp_path / "logs"
    logs.mkdir()
    code, lines, report = run_gpu.run_benchmark_files([f"{both}::test_two", f"{both}::test_one"], logs,
                                                      time.monotonic() + 300)  # fmt: skip
    assert code == 0 and len(lines) == 1 and "2 passed" in lines[0], lines
    assert sorted(bench["name"] for bench in report["benchmarks"]) == ["test_one", "test_two"]


def test_each_benchmark_file_runs_alone_and_their_reports_are_merged(run_gpu, tmp_path, monkeypatch):
    timed = "    benchmark.pedantic(lambda: None, rounds=2)\n"
    first = write_benchmarks(tmp_path, f"def test_one(benchmark):\n{timed}", "test_first.py")
    broken = write_benchmarks(
        tmp_path, "def test_two(benchmark):\n    raise RuntimeError('CUDA error')\n", "test_bad.py"
    )
    second = write_benchmarks(tmp_path, f"def test_three(benchmark):\n{timed}", "test_second.py")
    files = [str(first), str(broken), str(second)]
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "benchmarks.json").write_text('{"benchmarks": [{"name": "stale"}]}')
    code, lines, report = run_gpu.run_benchmark_files(files, logs, time.monotonic() + 300)
    assert sorted(bench["name"] for bench in report["benchmarks"]) == ["test_one", "test_three"]  # after a failure too
    assert code != 0 and len(lines) == 3 and "1 failed" in lines[1] and "1 passed" in lines[2], lines
    # Two files come back from the device ($OUT holds at most 8): one log, every file's output in turn, and
    # the merged reports.
    assert sorted(path.name for path in logs.iterdir()) == ["benchmarks.json", "gpu-benchmarks.log"]
    assert json.loads((logs / "benchmarks.json").read_text()) == report
    log = (logs / "gpu-benchmarks.log").read_text()
    assert [log.index(f"==== {name} ====") for name in files] == sorted(
        log.index(f"==== {name} ====") for name in files
    )
    assert "RuntimeError: CUDA error" in log
    # With less time than a reserve for the later file, the first one runs (the model-level targets come first):
    # a reserve for every later step had skipped the first files and run the last
    monkeypatch.setattr(run_gpu, "BENCHMARK_FILE_RESERVE_S", 1000)
    code, lines, report = run_gpu.run_benchmark_files([str(first), str(second)], logs, time.monotonic() + 300)
    assert code == 0 and "1 passed" in lines[0] and "1 passed" in lines[1], lines
    assert [bench["name"] for bench in report["benchmarks"]] == ["test_one", "test_three"]
    assert run_gpu.read_report(tmp_path / "missing.json") == {}
    (logs / "half.json").write_text('{"benchmarks": [')
    assert run_gpu.read_report(logs / "half.json") == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the report would run for real")
def test_the_launch_cost_report_runs_last_within_the_budget_or_says_why_not(run_gpu, tmp_path):
    assert run_gpu.launch_overhead(tmp_path, time.monotonic() + 5).startswith("not run: 5 s of the budget left")
    report = run_gpu.launch_overhead(tmp_path, time.monotonic() + run_gpu.LAUNCH_OVERHEAD_S + 60)
    assert report.startswith("exit 1:") and "needs a CUDA device" in report  # this machine has none
    assert "needs a CUDA device" in (tmp_path / "launch-overhead.log").read_text()


def test_kernel_counters_run_after_the_tests_on_request_within_their_share(run_gpu, tmp_path, monkeypatch):
    assert run_gpu.parse_arguments(["--counters"]).counters and not run_gpu.parse_arguments([]).counters
    reserve = run_gpu.BENCHMARK_FILE_RESERVE_S
    assert run_gpu.kernel_counters(tmp_path, time.monotonic() + reserve + 10).startswith("not run: 10 s of the budget")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ncu to be found (and none in the usual places on this machine)
    report = run_gpu.kernel_counters(tmp_path, time.monotonic() + reserve + 120)
    assert report.strip().startswith("Kernel counters: not run: no `ncu` on PATH")
    assert "Kernel counters: not run" in (tmp_path / "counters.log").read_text()
