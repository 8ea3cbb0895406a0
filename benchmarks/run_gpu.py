"""`make bench-gpu`: the GPU tests and every benchmark in one call, written up as Markdown.

Runs on the lent GPU machine (its own python3 with torch/triton/transformers installed): the GPU
tests (``pytest -m gpu`` over the test files carrying the mark, the quick ones first), then each GPU
benchmark file (``GPU_BENCHMARKS``) in a pytest of its own, and writes
``benchmarks/results/<date>-<gpu>.md`` with the versions, the outcome of each step and one table row
per benchmark (medians, ratios against the baseline, GB/s or GFLOP/s as recorded), the failed tests
named, and last each op's host cost and GPU time (benchmarks/launch_overhead.py). Five files are written
into $OUT as the runs go when that variable is set (the device tool brings $OUT back, even after a timeout,
but at most 8 files): gpu-tests.log, gpu-benchmarks.log (every benchmark file's output, one after the
other), benchmarks.json (the reports merged so far), launch-overhead.log and the results file; with
``--counters`` (Nsight Compute's counters of the fused kernels, benchmarks/kernel_counters.py, run after the
tests) also counters.log and counters.csv.
``run_gpu.py [--label NAME] [BENCHMARK_FILE ...] [--tests TEST_FILE ...]`` runs the named benchmark files
(or single tests, FILE::TEST; tests of one file named in a row share a pytest) only, and the GPU tests of the
named test files only (of every marked file otherwise), and names the results ``<date>-<gpu>-<label>.md``.

The whole call must come back within one device command (10 minutes, installs and start-up included:
call it with the device tool's timeout_s=600), so the steps share a wall-clock budget (``BUDGET_S``, 8.5
minutes; $FASTMINI_BENCH_GPU_BUDGET_S overrides it): the tests get at most ``TESTS_SHARE_S`` (and at most
``TESTS_MOST_OF_BUDGET`` of a smaller budget), each benchmark file what is left less a reserve for the later
files that time can still hold (when time is short the last files go unrun, never the first). A step that
reaches its share is interrupted like a Ctrl-C: pytest stops in the running test (xdist's workers finish theirs)
and still writes its summary and the JSON of the benchmarks already done (a benchmark stopped in its timed
rounds keeps those it timed: the table's rounds column says how many; one stopped before its first is dropped,
see benchmarks/conftest.py), so the results file is written with what finished. A second call of the same day
and label writes ``<...>-2.md``, never over the first.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The GPU tests run in this order (files marked gpu that are not listed follow, alphabetically): the quick
# ones that gate whole features first, so that a budget spent compiling the kernel tests' many
# specialisations (~2 s each) cuts those last.
GPU_TESTS_FIRST = [
    "tests/test_varlen_attention.py",
    "tests/test_trainers_on_device.py",
    "tests/test_runtime_cuda_graphs.py",
    "tests/test_runtime_l2_persistence.py",
    "tests/test_gradient_checkpointing.py",
]
# The benchmarks with a CUDA part, one pytest process each (a CUDA error that poisons a process, or a
# stop, costs one file's results, not the others'): the model-level targets first, then the kernel files
# (whose many Triton specialisations the GPU tests may have compiled already);
# the CPU-only encoder benchmark would spend device time on the host's CPU (and test_distill_step.py
# runs its GPU setup alone where CUDA is present).
GPU_BENCHMARKS = [
    "benchmarks/test_encoder_forward_gpu.py",
    "benchmarks/test_distill_step.py",
    "benchmarks/test_adapter_bottleneck.py",
    "benchmarks/test_add_layer_norm.py",
    "benchmarks/test_attention_kl.py",
    "benchmarks/test_logit_losses.py",
    "benchmarks/test_linear_gelu.py",
]
# Every benchmark here times a fixed number of rounds (benchmark.pedantic and the interleaved
# `compare`), so pytest-benchmark's --benchmark-max-time cannot bound them: wall-clock budgets do.
BUDGET_S = int(os.environ.get("FASTMINI_BENCH_GPU_BUDGET_S", "510"))
TESTS_SHARE_S = 220  # at most this for the GPU tests (the benchmarks get the rest)
TESTS_MOST_OF_BUDGET = 0.45  # and at most this fraction of a smaller budget
NO_TESTS_COLLECTED = 5  # pytest's exit code when every test was deselected
BENCHMARK_FILE_RESERVE_S = 40  # kept back for each benchmark file still to run when one starts
INTERRUPT_GRACE_S = 20  # after the interrupt, for pytest to finish the running test and write its reports
LAUNCH_OVERHEAD_S = 60  # benchmarks/launch_overhead.py runs last, when this much of the budget is left
COUNTERS_S = 150  # at most this for benchmarks/kernel_counters.py (--counters), after the tests


def pytest_command() -> list[str]:
    """The pytest of this interpreter's environment. Not ``python -m pytest``: that puts the checkout
    on sys.path, where the top-level kernels/ would shadow the `kernels` package transformers probes for."""
    beside = Path(sys.executable).parent / "pytest"
    found = str(beside) if beside.is_file() else shutil.which("pytest")
    if found is None:
        raise SystemExit("bench-gpu: no pytest next to this python or on PATH")
    return [found]


def log_directory() -> Path:
    """$OUT when the device tool set it (what is written there comes back even if a call times out),
    else a temporary directory."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp())


GPU_TEST_WORKERS = 6  # pytest-xdist processes for the GPU tests, where it is installed (16 cores there)


def parallel_workers() -> list[str]:
    """pytest-xdist's options where the plugin is installed: the GPU tests spend most of their time compiling
    Triton specialisations on the host's CPU (~2 s each), which several processes do side by side. Tests are
    handed out one by one (the kernel files hold ~190 of them), except those of an ``xdist_group``, which
    share a worker (the L2 persistence tests: the set-aside is the device's)."""
    return ["-n", str(GPU_TEST_WORKERS), "--dist", "loadgroup"] if importlib.util.find_spec("xdist") else []


def per_test_timeout(seconds: int) -> list[str]:
    """pytest-timeout's limit where the plugin is installed: a hung capture or kernel fails one test,
    not the whole call."""
    return [f"--timeout={seconds}"] if importlib.util.find_spec("pytest_timeout") else []


def run(arguments: list[str], log: Path, budget_s: float, append: bool = False) -> tuple[int, str]:
    """pytest with its output streamed into ``log`` as it runs, stopped within ``budget_s`` seconds."""
    return run_within(pytest_command() + arguments, log, budget_s, append=append)


def run_within(
    command: list[str], log: Path, budget_s: float, grace_s: float | None = None, append: bool = False
) -> tuple[int, str]:
    """``command`` with its output in ``log`` (after what it holds already when ``append``); after
    ``budget_s - grace_s`` seconds it gets SIGINT (pytest then ends the session cleanly: summary,
    --benchmark-json), after ``budget_s`` SIGKILL. The grace is INTERRUPT_GRACE_S, or a quarter of a shorter
    budget (a 40 s share still runs 30 s). Returns the exit code and this command's output."""
    if grace_s is None:
        grace_s = min(INTERRUPT_GRACE_S, budget_s / 4)
    start = log.stat().st_size if append and log.exists() else 0
    with log.open("a" if append else "w") as stream:
        # A session of its own: a kill then reaches the compile workers it started too. SIGINT back to its
        # default: a command started in the background by a shell without job control (as `make bench-gpu`
        # may be) inherits it ignored, and Python then never raises KeyboardInterrupt: pytest would run on to
        # the kill and write no reports.
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_interrupt_by_default,
        )
        try:
            code, note = _stop_within(process, budget_s, grace_s)
        except BaseException:  # the runner itself interrupted (Ctrl-C): its own session no longer reaches the step
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        _kill_what_it_left(process)
    if note:
        with log.open("a") as stream:
            stream.write(f"\n{note}\n")
    with log.open() as stream:
        stream.seek(start)
        output = stream.read()
    print(output[-3000:], flush=True)
    return code, output


def _interrupt_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_what_it_left(process: subprocess.Popen) -> None:
    """A step that ended may leave processes of its session behind (a compile worker, a profiled process whose
    profiler timed out), holding a CUDA context and CPU into the next step: they go with it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left (or the group id reused: not ours to kill)
        pass


def _stop_within(process: subprocess.Popen, budget_s: float, grace_s: float) -> tuple[int, str]:
    """The exit code, and a note when the budget stopped it."""
    try:
        return process.wait(timeout=max(budget_s - grace_s, 1)), ""
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=grace_s), f"bench-gpu: stopped at its {budget_s:.0f} s budget (interrupted)"
    except subprocess.TimeoutExpired:  # stuck in a kernel or a compile: no reports from it
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait(), f"bench-gpu: stopped at its {budget_s:.0f} s budget (killed)"


def gpu_test_files() -> list[str]:
    """Every test file with a gpu mark: GPU_TESTS_FIRST, then the others (the kernel files) alphabetically.
    pytest-xdist's workers take the tests in this order too, so a stop at the budget cuts the kernel tests."""
    marked = sorted(
        f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in path.read_text()
    )
    quick = [name for name in GPU_TESTS_FIRST if (ROOT / name).is_file()]
    return quick + [name for name in marked if name not in GPU_TESTS_FIRST]


def read_report(path: Path) -> dict:
    """pytest-benchmark's JSON, or an empty report when a stopped run left none or half a file."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def benchmark_steps(names: list[str]) -> list[list[str]]:
    """The pytest runs ``names`` make, in order: each file alone, and tests of one file named one after the other
    (FILE::TEST) together, so that they share one budget, not one each less a reserve for the others (session 15:
    three tests of one file, each in a run of its own, were all stopped before their first timed round)."""
    steps: list[list[str]] = []
    for name in names:
        same_file = steps and "::" in name and "::" in steps[-1][-1]
        if same_file and steps[-1][-1].split("::")[0] == name.split("::")[0]:
            steps[-1].append(name)
        else:
            steps.append([name])
    return steps


def step_budget(left: float, steps_after: int) -> float:
    """A benchmark step's share of the ``left`` seconds: all but a reserve for each later step that the time left
    can still hold. Steps run in the order named (the model-level targets first): when time is short the last
    ones go unrun, never the first (a reserve for every later step skipped the first files and ran the last)."""
    later_that_fit = min(steps_after, max(0, int(left // BENCHMARK_FILE_RESERVE_S) - 1))
    return left - BENCHMARK_FILE_RESERVE_S * later_that_fit


def tests_share(budget_s: float) -> float:
    """The GPU tests' share of the budget: TESTS_SHARE_S, or less of a small budget, so the benchmarks keep some."""
    return min(TESTS_SHARE_S, TESTS_MOST_OF_BUDGET * budget_s)


def run_benchmark_files(files: list[str], logs: Path, deadline: float) -> tuple[int, list[str], dict]:
    """Each file (or run of tests of one file, benchmark_steps) in its own pytest, within what is left before
    ``deadline`` less a reserve for each step after it: the exit code (the first failure's), one summary line
    per step, the merged reports. The outputs follow one another in ``logs``/gpu-benchmarks.log; the reports
    merged so far are rewritten to ``logs``/benchmarks.json after each step."""
    code, lines, merged = 0, [], {"benchmarks": []}
    log, merged_path = logs / "gpu-benchmarks.log", logs / "benchmarks.json"
    log.write_text("")
    merged_path.unlink(missing_ok=True)  # a file left by an earlier run must not count as this one's
    steps = benchmark_steps(files)
    with tempfile.TemporaryDirectory() as scratch:
        for index, names in enumerate(steps):
            json_path = Path(scratch) / f"benchmarks-{index}.json"
            budget = step_budget(deadline - time.monotonic(), len(steps) - index - 1)
            title = " ".join(names)
            if budget < INTERRUPT_GRACE_S:
                lines.append(f"`{title}`: not run (no time left)")
                code = code or 1
                continue
            with log.open("a") as stream:
                stream.write(f"\n==== {title} ====\n")
            file_code, output = run(
                [*names, "--benchmark-only", "-q", "-p", "no:cacheprovider", f"--benchmark-json={json_path}",
                 *per_test_timeout(300)],
                log,
                budget,
                append=True,
            )  # fmt: skip
            lines.append(f"`{title}`: {summary_line(output)} (exit {file_code})")
            code = code or file_code
            merged["benchmarks"] += read_report(json_path).get("benchmarks", [])
            merged_path.write_text(json.dumps(merged))
    return code, lines, merged


def failed_tests(output: str) -> list[str]:
    """pytest's short summary lines (-rfE) of the tests that failed or errored: only after its banner, where
    a captured log's "ERROR    logger:..." lines cannot be taken for them."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if "short test summary info" in line), len(lines))
    return [line.strip() for line in lines[start + 1 :] if re.match(r"(FAILED|ERROR) (collecting )?\S+(::|\.py)", line)]


def launch_overhead(logs: Path, deadline: float) -> str:
    """benchmarks/launch_overhead.py's report (host cost and GPU time of each op), or why there is none."""
    left = deadline - time.monotonic()
    # The benchmarks stop LAUNCH_OVERHEAD_S before the deadline, but one killed after its grace ends a little
    # later: half of the reserve is enough to run on.
    if left < LAUNCH_OVERHEAD_S / 2:
        return f"not run: {left:.0f} s of the budget left, it wants at least {LAUNCH_OVERHEAD_S // 2}"
    code, output = run_within(
        [sys.executable, str(ROOT / "benchmarks" / "launch_overhead.py")], logs / "launch-overhead.log", left
    )
    return output if code == 0 else f"exit {code}:\n{output[-8000:]}"


def kernel_counters(logs: Path, deadline: float) -> str:
    """benchmarks/kernel_counters.py's table (ncu's counters of the fused kernels), or why there is none. It runs
    within its own budget (its cases stop starting when that is spent) plus a margin for the case under way."""
    budget = min(COUNTERS_S, deadline - time.monotonic() - BENCHMARK_FILE_RESERVE_S)
    if budget < 30:
        return f"not run: {budget:.0f} s of the budget left for it, it wants at least 30"
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_counters.py"), "--budget-s", str(int(budget * 0.7))]
    code, output = run_within(command, logs / "counters.log", budget)
    return output if code == 0 else f"exit {code}:\n```\n{output[-8000:]}\n```"


def summary_line(output: str) -> str:
    pattern = r"\b(passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b|no tests ran|no gpu-marked tests"
    lines = [line for line in output.splitlines() if re.search(pattern, line)]
    summary = lines[-1].strip("= ") if lines else "no summary"
    not_found = [line.strip() for line in output.splitlines() if line.startswith("ERROR: not found")]
    if not_found:
        summary = f"{summary}; {'; '.join(not_found)}"
    stopped = [line for line in output.splitlines() if line.startswith("bench-gpu: stopped")]
    return f"{summary}; {stopped[-1].removeprefix('bench-gpu: ')}" if stopped else summary


def markdown_cell(value: object) -> str:
    """``value`` as one table cell: error texts in extra_info may hold newlines (which end the row)
    and pipes (which split it)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def benchmark_rows(report: dict) -> list[str]:
    # pytest-benchmark's own timing covers one contender per test (fastmini's fused path, the default tile
    # or extra_info's pedantic_contender); every contender's interleaved median is in the details.
    # Its rounds too: a step stopped at its budget keeps the rounds it timed (pedantic), fewer than planned.
    rows = ["| benchmark | median (ms) of the timed contender | rounds | details |", "|---|---|---|---|"]
    for bench in report.get("benchmarks", []):
        info = {k: v for k, v in bench.get("extra_info", {}).items() if k not in ("device",)}
        details = "; ".join(f"{k}: {v}" for k, v in info.items())
        median = f"{bench['stats']['median'] * 1e3:.4f}"
        rounds = bench["stats"].get("rounds", "")
        rows.append(f"| {markdown_cell(bench['name'])} | {median} | {rounds} | {markdown_cell(details)} |")
    return rows


def missing_datasets_hint() -> str | None:
    """A one-line hint when `datasets` cannot be imported: the trainers' GPU tests need it, the rest do not."""
    try:
        import datasets  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a broken install (e.g. no pyarrow) is as missing
        return (
            f"`datasets` is not importable here ({type(error).__name__}: {markdown_cell(error)}): the trainers' "
            "GPU tests will fail, the others run. Run `make device-wheels` on the CPU machine and carry "
            ".device-wheels (see the Makefile)"
        )
    return None


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The GPU tests and benchmarks in one call (make bench-gpu).")
    parser.add_argument(
        "benchmarks",
        nargs="*",
        default=GPU_BENCHMARKS,
        help="benchmark files (or FILE::TEST ids; those of one file in a row share a pytest) to run, each file in a "
        "pytest of its own (default: GPU_BENCHMARKS)",
    )
    parser.add_argument("--label", help="results go to benchmarks/results/<date>-<gpu>-<label>.md")
    parser.add_argument(
        "--tests", nargs="+", metavar="TEST_FILE", help="the GPU tests of these files only (default: every marked file)"
    )
    parser.add_argument(
        "--no-tests", action="store_true", help="no GPU tests: the whole budget to the benchmarks (a timing rerun)"
    )
    parser.add_argument(
        "--no-launch-overhead",
        action="store_true",
        help=f"skip benchmarks/launch_overhead.py, which otherwise keeps the budget's last {LAUNCH_OVERHEAD_S} s",
    )
    parser.add_argument(
        "--counters",
        action="store_true",
        help=f"after the GPU tests, Nsight Compute's counters of the fused kernels (benchmarks/kernel_counters.py, "
        f"at most {COUNTERS_S} s of the budget)",
    )
    arguments = parser.parse_args(argv)
    if arguments.no_tests and arguments.tests:
        parser.error("--tests names GPU tests to run, --no-tests runs none: give one of them")
    # --tests takes every name after it: a benchmark file named there would run as a test and leave the
    # benchmarks to their default, all of them
    misplaced = [name for name in arguments.tests or [] if not name.removeprefix("./").startswith("tests/")]
    misplaced += [name for name in arguments.benchmarks if not name.removeprefix("./").startswith("benchmarks/")]
    if misplaced:
        parser.error(
            f"{', '.join(misplaced)}: test files go after --tests (tests/...), benchmark files before it "
            "(benchmarks/...)"
        )
    if arguments.label is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", arguments.label):
        parser.error(f"--label must be lowercase letters, digits and '-', got {arguments.label!r}")
    named = [*arguments.benchmarks, *(arguments.tests or [])]
    missing = [name for name in named if not (ROOT / name.split("::")[0]).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    return arguments


def without_no_tests_failure(code: int, output: str) -> tuple[int, str]:
    """pytest's exit 5 (every test deselected: the files named hold no gpu-marked test) is no failure of the call:
    exit 0, and the results say so."""
    if code == NO_TESTS_COLLECTED:
        return 0, output + "\nno gpu-marked tests in the files named (pytest exit 5)\n"
    return code, output


def unused_name(directory: Path, stem: str) -> Path:
    """``stem``.md, or ``stem``-2.md, -3, ... where a call of the same day and label wrote one already."""
    target, number = directory / f"{stem}.md", 1
    while target.exists():
        number += 1
        target = directory / f"{stem}-{number}.md"
    return target


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    import torch
    import transformers

    if not torch.cuda.is_available():
        print("bench-gpu needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    deadline = time.monotonic() + BUDGET_S
    hint = missing_datasets_hint()
    if hint:
        print(f"bench-gpu: {hint}", flush=True)
    gpu = torch.cuda.get_device_name(0)
    logs = log_directory()
    test_files, workers = ([] if arguments.no_tests else arguments.tests or gpu_test_files()), parallel_workers()
    tests_code, tests_output = 0, ""
    if test_files:
        tests_code, tests_output = run(
            ["-m", "gpu", *test_files, "-q", "-rfEs", "-p", "no:cacheprovider", *workers, *per_test_timeout(120)],
            logs / "gpu-tests.log",
            min(tests_share(BUDGET_S), deadline - time.monotonic()),
        )  # fmt: skip
        tests_code, tests_output = without_no_tests_failure(tests_code, tests_output)
    counters = kernel_counters(logs, deadline) if arguments.counters else None
    kept_back = 0 if arguments.no_launch_overhead else LAUNCH_OVERHEAD_S
    bench_code, bench_lines, report = run_benchmark_files(arguments.benchmarks, logs, deadline - kept_back)
    failures = failed_tests(tests_output)
    launch_costs = "not run (--no-launch-overhead)" if arguments.no_launch_overhead else launch_overhead(logs, deadline)
    today = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    lines = [
        f"# fastmini GPU results, {today}, {gpu}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
        f"CUDA {torch.version.cuda}. Produced by `make bench-gpu` (benchmarks/run_gpu.py).",
        "",
        f"GPU tests (`{' '.join(['pytest', '-m', 'gpu', *workers])}` over {len(test_files)} files): "
        + (f"{summary_line(tests_output)} (exit {tests_code})" if test_files else "not run (--no-tests)"),
        *[f"- {markdown_cell(line)}" for line in failures],
        "",
        "Benchmarks (`pytest FILE --benchmark-only`, one process a file):",
        "",
        *[f"- {line}" for line in bench_lines],
        *(["", f"Note: {hint}"] if hint else []),
        "",
        *benchmark_rows(report),
        "",
        *(
            ["Nsight Compute's counters (`python3 benchmarks/kernel_counters.py`):", "", counters.rstrip(), ""]
            if counters is not None
            else []
        ),
        "Each op's host cost and GPU time (`python3 benchmarks/launch_overhead.py`):",
        "",
        "```",
        launch_costs.rstrip(),
        "```",
        "",
    ]
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    target = unused_name(results, f"{today}-{slug}{'-' + arguments.label if arguments.label else ''}")
    target.write_text("\n".join(lines))
    print(f"wrote {target}")
    if os.environ.get("OUT"):  # the device tool brings $OUT back: the results beside the logs and the JSON
        shutil.copy(target, logs / target.name)
    return tests_code or bench_code


if __name__ == "__main__":
    sys.exit(main())
