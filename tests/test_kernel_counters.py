"""benchmarks/kernel_counters.py without a GPU or ncu: the ncu command it builds, how it reads ncu's CSV, what
it writes when ncu fails or is missing (a stand-in ncu script plays the profiler), and that each case's step
runs the op it names (on tiny inputs, through the Triton interpreter)."""

from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path

import pytest
import torch

KERNEL_COUNTERS = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_counters.py"

# What `ncu --csv --page raw --print-units base` prints: its own notes, a header, a units row, one row a kernel.
NCU_CSV = """==PROF== Connected to process 4242
==PROF== Profiling "_forward_kernel": 0%....50%....100% - 9 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC",\
"gpu__time_duration.sum","dram__bytes_read.sum","dram__bytes_write.sum",\
"dram__throughput.avg.pct_of_peak_sustained_elapsed","lts__throughput.avg.pct_of_peak_sustained_elapsed",\
"sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__warps_active.avg.pct_of_peak_sustained_active",\
"launch__grid_size","launch__registers_per_thread",\
"smsp__average_warp_latency_issue_stalled_barrier.ratio","smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio",\
"smsp__average_warp_latency_issue_stalled_selected.ratio","smsp__average_warp_latency_issue_stalled_wait.ratio",\
"smsp__average_warp_latency_issue_stalled_mio_throttle.ratio"
"","","","","","","","","","","","nsecond","byte","byte","%","%","%","%","","register/thread","","","","",""
"0","4242","python3","host","_forward_kernel","1","7","(256, 1, 1)","(8, 1, 1)","0","9.0",\
"10,240","1,572,864","196,608","12.5","40.25","8.0","11.9","8","126","1.5","6.25","1.0","0.5","2.0"
"1","4242","python3","host","_backward_rows_kernel","1","7","(256, 1, 1)","(512, 1, 1)","0","9.0",\
"20,000","n/a","196,608","30.0","50.0","20.0","45.0","512","96","0.1","2.0","1.0","3.0","0.2"
==PROF== Disconnected from process 4242
"""


@pytest.fixture(scope="module")
def counters():
    spec = importlib.util.spec_from_file_location("kernel_counters", KERNEL_COUNTERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name)


def test_the_csv_gives_one_record_a_kernel_without_notes_or_units(counters):
    kernels = counters.parse_raw_csv(NCU_CSV)
    assert [kernel["Kernel Name"] for kernel in kernels] == ["_forward_kernel", "_backward_rows_kernel"]
    assert counters.number(kernels[0]["gpu__time_duration.sum"]) == 10240.0
    assert counters.number(kernels[1]["dram__bytes_read.sum"]) is None  # "n/a"
    assert counters.parse_raw_csv("==ERROR== ERR_NVGPUCTRPERM\n") == []


def test_a_row_reports_time_dram_rate_and_the_costliest_stalls(counters):
    first, second = counters.parse_raw_csv(NCU_CSV)
    row = counters.table_row("adapter forward, 128 rows", first).split(" | ")
    header = counters.TABLE_HEADER.split(" | ")
    cells = dict(zip(header, row, strict=True))
    assert cells["time (us)"] == "10.24" and cells["DRAM MB"] == "1.77"
    assert cells["DRAM GB/s"] == "173"  # 1,769,472 bytes in 10,240 ns
    assert cells["registers"] == "126" and cells["grid"] == "8" and cells["L2 %"] == "40.2"
    # the most cycles first, and "selected" (issuing) is no stall
    stalls = cells["top stalls (cycles per issued instruction) |"]
    assert stalls == "long_scoreboard 6.2, mio_throttle 2.0, barrier 1.5 |"
    second_cells = dict(zip(header, counters.table_row("x", second).split(" | "), strict=True))
    assert second_cells["DRAM MB"] == "n/a" and second_cells["DRAM GB/s"] == "n/a"  # a byte count missing
    assert counters.top_stalls({"gpu__time_duration.sum": "1"}) == "n/a"


def test_the_command_leaves_clocks_alone_and_profiles_only_the_driven_call(counters):
    command = counters.ncu_command("ncu", "adapter forward, 128 rows")
    assert command[command.index("--clock-control") + 1] == "none"
    assert command[command.index("--profile-from-start") + 1] == "off"
    assert command[command.index("--kernel-name") + 1] == counters.KERNEL_NAMES
    assert command[-2:] == ["--driver", "adapter forward, 128 rows"]
    assert "--metrics" in command and "--metrics" not in counters.ncu_command("ncu", "x", extra_metrics=False)


def stand_in_ncu(tmp_path: Path, script: str) -> str:
    """An executable that plays ncu: ``script`` is bash, its arguments in "$@"."""
    path = tmp_path / "ncu"
    path.write_text(f"#!/usr/bin/env bash\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_profile_is_read_and_an_unknown_metric_retried_without_the_extras(counters, tmp_path):
    (tmp_path / "out.csv").write_text(NCU_CSV)
    plain = stand_in_ncu(tmp_path, f'cat "{tmp_path}/out.csv"')
    kernels, text, problem = counters.profile(plain, "adapter forward, 128 rows", 30)
    assert len(kernels) == 2 and problem == "" and "_forward_kernel" in text
    picky = stand_in_ncu(
        tmp_path,
        f'if [[ " $* " == *" --metrics "* ]]; then echo "==ERROR== Failed to find metric dram__bytes_read.sum"; '
        f'exit 1; fi; cat "{tmp_path}/out.csv"',
    )
    kernels, _text, problem = counters.profile(picky, "adapter forward, 128 rows", 30)
    assert len(kernels) == 2 and problem == ""


def test_the_retry_runs_within_the_cases_time_not_a_time_of_its_own(counters, tmp_path, monkeypatch):
    """A first run that fails late leaves no time for the retry without the extra metrics: the case says so
    instead of overrunning the budget run_gpu.py gave the whole script."""
    calls = tmp_path / "calls"
    slow_and_picky = stand_in_ncu(
        tmp_path, f'echo x >> "{calls}"; sleep 2; echo "==ERROR== Failed to find metric dram__bytes_read.sum"'
    )
    monkeypatch.setattr(counters, "RETRY_MIN_S", 5)
    kernels, _text, problem = counters.profile(slow_and_picky, "adapter forward, 128 rows", 6)
    assert kernels == [] and problem.endswith("(no time left to retry without the extra metrics)")
    assert problem.startswith("==ERROR== Failed to find metric")
    assert calls.read_text().count("x") == 1  # ncu ran once: no retry started


def test_an_error_no_case_escapes_stops_the_other_cases(counters, tmp_path):
    """No access to the counters fails every case alike: one try, not a torch start a case until the budget."""
    calls = tmp_path / "calls"
    refused = stand_in_ncu(tmp_path, f'echo x >> "{calls}"; echo "==ERROR== ERR_NVGPUCTRPERM - no permission"; exit 1')
    cases = list(counters.CASES)[:3]
    lines, _csv = counters.report(cases, 60, refused)
    assert calls.read_text().count("x") == 1
    assert lines[-2:] == [f"- {name}: not run (ncu fails on every case: see above)" for name in cases[1:]]


def test_a_case_past_its_time_is_killed_with_the_process_it_profiles(counters, tmp_path, gone):
    """ncu's child (the profiled python, holding a CUDA context) must not outlive a timed-out case."""
    child_pid = tmp_path / "child.pid"
    hanging = stand_in_ncu(tmp_path, f'sleep 60 & echo $! > "{child_pid}"; wait')
    kernels, _text, problem = counters.profile(hanging, "adapter forward, 128 rows", 2)
    assert kernels == [] and problem == "stopped after 2 s"
    assert gone(int(child_pid.read_text()))


def test_an_interrupt_kills_the_profiled_process_too(counters, tmp_path, gone, monkeypatch):
    """ncu runs in a session of its own, out of reach of a terminal's Ctrl-C: profile() must kill it."""
    child_pid = tmp_path / "child.pid"
    hanging = stand_in_ncu(tmp_path, f'sleep 60 & echo $! > "{child_pid}"; wait')
    started = counters.subprocess.Popen

    def interrupted_once_started(*args, **kwargs):
        process = started(*args, **kwargs)
        while not child_pid.exists() or not child_pid.read_text().strip():
            counters.time.sleep(0.05)

        def communicate(timeout=None):
            raise KeyboardInterrupt

        process.communicate = communicate
        return process

    monkeypatch.setattr(counters.subprocess, "Popen", interrupted_once_started)
    with pytest.raises(KeyboardInterrupt):
        counters.profile(hanging, "adapter forward, 128 rows", 30)
    assert gone(int(child_pid.read_text()))


def test_each_case_is_emitted_when_done(counters, tmp_path, monkeypatch):
    """main() prints lines as report() emits them: what a run stopped by its budget had done is in its log."""
    (tmp_path / "out.csv").write_text(NCU_CSV)
    cases = ["adapter forward, 128 rows", "add_layer_norm, 128 rows"]
    # the first case's profile succeeds; by the second, the first's rows were emitted already
    marker = tmp_path / "ran"
    script = f'if [ -e "{marker}" ]; then echo "==ERROR== gone"; exit 1; fi; touch "{marker}"; cat "{tmp_path}/out.csv"'
    emitted, seen_by_second = [], []
    original_profile = counters.profile

    def profile(ncu, name, timeout_s):
        if name == cases[1]:
            seen_by_second.extend(emitted)
        return original_profile(ncu, name, timeout_s)

    monkeypatch.setattr(counters, "profile", profile)
    lines, _csv = counters.report(cases, 60, stand_in_ncu(tmp_path, script), emit=emitted.append)
    assert emitted == lines and lines[-1] == f"- {cases[1]}: no counters: ==ERROR== gone"
    assert len(seen_by_second) == 4  # the table's two header lines and the first case's two kernels


def test_no_counters_says_why_in_the_table_and_no_ncu_says_so(counters, tmp_path, capsys, monkeypatch):
    refusal = "==ERROR== ERR_NVGPUCTRPERM - no permission to the counters"
    refused = stand_in_ncu(tmp_path, f'echo "{refusal}"; exit 1')
    lines, _csv = counters.report(["adapter forward, 128 rows"], 60, refused)
    assert lines[-1] == f"- adapter forward, 128 rows: no counters: {refusal}"
    lines, _csv = counters.report(["adapter forward, 128 rows"], 5, refused)
    assert lines[-1] == "- adapter forward, 128 rows: not run (5 s budget spent)"
    monkeypatch.setattr(counters, "find_ncu", lambda: None)
    monkeypatch.delenv("OUT", raising=False)
    assert counters.main([]) == 0
    assert capsys.readouterr().out.startswith("Kernel counters: not run: no `ncu` on PATH")


def test_an_unknown_case_is_refused_with_the_known_ones(counters, capsys):
    with pytest.raises(SystemExit):
        counters.main(["adapter forward, 7 rows"])
    error = capsys.readouterr().err
    assert "unknown case(s) ['adapter forward, 7 rows']" in error and "adapter forward, 16384 rows" in error


@pytest.mark.parametrize(
    "op, inputs", [("adapter_bottleneck", 7), ("add_layer_norm", 4), ("add_layer_norm_adapter", 10)]
)
def test_each_step_runs_its_op_on_the_triton_backend(counters, monkeypatch, op, inputs):
    from fastmini.kernels import adapter_bottleneck as kernels

    import fastmini.ops as ops

    calls = []
    original = getattr(ops, op)
    monkeypatch.setattr(ops, op, lambda *args, **options: calls.append((args, options)) or original(*args, **options))
    monkeypatch.setattr(kernels, "BACKWARD_PATH", kernels.BACKWARD_PATH)  # restored after the split-k setting
    output = counters.case_step(counters.Case(op, 5), torch.device("cpu"))()
    assert output.shape == (5, 768) and output.dtype == torch.bfloat16 and not output.requires_grad
    ((args, options),) = calls
    assert options == {"backend": "triton"}
    # the op's torch reference on the same inputs: the step ran the op it names, on inputs that make it work
    reference = getattr(ops, f"{op}_ref")
    expected = reference(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(output.float(), expected, atol=0.1, rtol=0.05)
    hidden, bottleneck, _adapter_eps, _layer_norm_eps = counters._published_sizes()
    assert (hidden, bottleneck) == (768, 48) and args[0].shape == (5, hidden)
    split_k = (("kernels.adapter_bottleneck", "BACKWARD_PATH", "split-k"),)
    gradients = counters.case_step(counters.Case(op, 5, backward=True, settings=split_k), torch.device("cpu"))()
    assert kernels.BACKWARD_PATH == "split-k" and len(gradients) == inputs
