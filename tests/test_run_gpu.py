"""benchmarks/run_gpu.py (`make bench-gpu`) without a GPU: the Markdown it writes and the time budget
that makes it come back within one device call with what finished."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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
    assert unescaped.count("|") == header.count("|") == 4  # three cells, whatever the error said
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
    code, output = run_gpu.run_within([sys.executable, "-c", program], tmp_path / "step.log", budget_s=4, grace_s=2)
    assert code == 2 and done.read_text() == "partial"  # interrupted in its sleep, not after it
    assert "stopped at its 4 s budget (interrupted)" in output
    assert run_gpu.summary_line("1 passed, 2 skipped in 3s\n" + output).endswith("(interrupted)")


def test_a_step_that_ignores_the_interrupt_is_killed(run_gpu, tmp_path):
    program = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('started', flush=True); "
        "time.sleep(60)"
    )
    code, output = run_gpu.run_within([sys.executable, "-c", program], tmp_path / "step.log", budget_s=4, grace_s=2)
    assert code != 0 and "started" in output and "(killed)" in output  # a sleep to its end would exit 0


def test_interrupted_benchmarks_still_write_their_json(run_gpu, tmp_path):
    """What the budget relies on: pytest-benchmark saves --benchmark-json at the end of an interrupted session."""
    (tmp_path / "test_slow.py").write_text(
        "import time\n"
        "def test_fast(benchmark):\n    benchmark.pedantic(lambda: None, rounds=3)\n"
        "def test_slow(benchmark):\n    time.sleep(60)\n"
    )
    report = tmp_path / "bench.json"
    code, output = run_gpu.run_within(
        [*run_gpu.pytest_command(), str(tmp_path / "test_slow.py"), "-q", "-p", "no:cacheprovider",
         f"--rootdir={tmp_path}", f"--benchmark-json={report}"],
        tmp_path / "bench.log",
        budget_s=12,
        grace_s=5,
    )  # fmt: skip
    assert "(interrupted)" in output, output
    assert [bench["name"] for bench in json.loads(report.read_text())["benchmarks"]] == ["test_fast"]
