"""Hardware counters of the fused kernels (Nsight Compute) at the sizes the GPU targets name: where their time goes.

``python3 benchmarks/kernel_counters.py [--budget-s S] [CASE ...]`` on a GPU machine with ``ncu`` (the lent
H100/H200 image has it; it reads counters on the Firecracker runtime, not on gVisor: the device tool's
KINDS.md) runs each case (``CASES``) in a process of its own under ``ncu``: the case's op is called a few times
first (Triton compiles, caches warm), then once between cudaProfilerStart and cudaProfilerStop, so ncu profiles
that one call's Triton kernels and nothing else. Each kernel becomes a table row (printed on stdout, Markdown):
GPU time, DRAM bytes and rate, DRAM / L2 / SM throughput as % of their peaks, achieved occupancy, registers,
and the warp stall reasons that cost the most cycles per issued instruction. Clocks are left alone
(``--clock-control none``: the device tool's METHOD.md). ncu's CSV of every case is also written to
$OUT/counters.csv when $OUT is set. ``make bench-gpu BENCH_GPU_ARGS='--counters ...'`` runs this after the GPU
tests and puts the table in the results file.

Why: the benchmarks say how long the adapter takes (44.5% of the copy bandwidth at 16384 rows; ~10 us at 128 rows
whatever the tiling, H200, session 15), not why; the counters say whether a kernel waits on DRAM, on L2, on
its own loads (long scoreboard) or on barriers, which decides what to change next. A case's numbers are of one
call under ncu's replay (caches flushed between passes by default), so its time is a little above the
benchmarks' warm medians: read the percentages and stalls, take times from the benchmarks.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    op: str  # "adapter_bottleneck", "add_layer_norm_adapter" or "add_layer_norm", always on the Triton backend
    rows: int  # x is (rows, H), H and R the published MiniALBERT's, bf16
    backward: bool = False  # a forward and backward (training step) instead of an inference forward
    # (module under fastmini, global, value) set in the driver process before the op runs
    settings: tuple[tuple[str, str, object], ...] = field(default=())


CASES = {
    # (1, 128): each of the 12 adapter calls of the graphed forward took ~10 us (H200), whatever the tiling
    "adapter forward, 128 rows": Case("adapter_bottleneck", 128),
    # the CUDA-core forward for few rows and the LayerNorm folded into the adapter: never run on a GPU yet
    "adapter forward, 128 rows, rows kernel": Case(
        "adapter_bottleneck", 128, settings=(("kernels.adapter_bottleneck", "ROWS_KERNEL_UP_TO", 128),)
    ),
    "add_layer_norm_adapter forward, 128 rows": Case("add_layer_norm_adapter", 128),
    "adapter forward, 1024 rows": Case("adapter_bottleneck", 1024),
    # the forward target: >= 80% of the copy bandwidth here (44.5% measured)
    "adapter forward, 16384 rows": Case("adapter_bottleneck", 16384),
    # the forward+backward target: >= 3x torch's composition (0.99x measured): the backward's two designs
    "adapter forward+backward, 16384 rows": Case("adapter_bottleneck", 16384, backward=True),
    "adapter forward+backward, 16384 rows, split-k": Case(
        "adapter_bottleneck",
        16384,
        backward=True,
        settings=(("kernels.adapter_bottleneck", "BACKWARD_PATH", "split-k"),),
    ),
    # the shared layer's residual + LayerNorm beside the adapter: 2 calls a recursion too
    "add_layer_norm forward, 128 rows": Case("add_layer_norm", 128),
    "add_layer_norm forward, 16384 rows": Case("add_layer_norm", 16384),
}
NCU_SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats")
NCU_EXTRA_METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")  # retried without them if ncu lacks them
KERNEL_NAMES = "regex:^_"  # fastmini's Triton kernels (every one is named _..._kernel), not torch's own
BUDGET_S = 150  # all cases together (each costs a process start, cached compiles and ncu's replay passes)
CASE_TIMEOUT_S = 90  # one case, its retry without the extra metrics included
RETRY_MIN_S = 10  # a retry is not started with less of the case's time left
NO_NCU = "no `ncu` on PATH (nor in /usr/local/cuda/bin, /opt/nvidia/nsight-compute)."
# ncu's errors that no case would escape (no access to the counters, its library missing, the profiler not
# starting): after the first, the other cases are not run, each of which would pay a torch start for the same.
FAILS_EVERY_CASE = ("ERR_NVGPUCTRPERM", "LibraryNotLoaded", "Failed to initialize", "Failed to load")
STALLS_SHOWN = 3
NOT_A_STALL = ("selected", "not_selected")  # issuing, or eligible and waiting for its turn: not a wait on anything


def find_ncu() -> str | None:
    """ncu on PATH, else in the usual install places of the CUDA toolkit and of Nsight Compute."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = ["/usr/local/cuda/bin/ncu", *sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)]
    return next((path for path in candidates if os.access(path, os.X_OK)), None)


def ncu_command(ncu: str, case_name: str, extra_metrics: bool = True) -> list[str]:
    sections = [argument for section in NCU_SECTIONS for argument in ("--section", section)]
    metrics = ["--metrics", ",".join(NCU_EXTRA_METRICS)] if extra_metrics else []
    return [
        ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
        "--kernel-name-base", "function", "--kernel-name", KERNEL_NAMES, *sections, *metrics,
        "--csv", "--page", "raw", "--print-units", "base",
        sys.executable, str(Path(__file__).resolve()), "--driver", case_name,
    ]  # fmt: skip


def parse_raw_csv(text: str) -> list[dict[str, str]]:
    """The kernels of ``ncu --csv --page raw`` output, one dict (metric name -> value as printed) each. Lines that
    are not CSV records (ncu's ==PROF== notes, the program's own output) are skipped, and so is the units row
    that follows the header (its ID is empty)."""
    records = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(records))
    if not rows or "ID" not in rows[0]:
        return []
    header, id_column = rows[0], rows[0].index("ID")
    return [dict(zip(header, row, strict=False)) for row in rows[1:] if len(row) > id_column and row[id_column]]


def number(value: str | None) -> float | None:
    """A value as ncu prints it ("1,234.5", "n/a"), or None."""
    try:
        return float(value.replace(",", "")) if value else None
    except ValueError:
        return None


def top_stalls(kernel: dict[str, str], count: int = STALLS_SHOWN) -> str:
    """The stall reasons with the most cycles per issued instruction, as "long_scoreboard 4.1, barrier 1.2"."""
    stalls = []
    for metric, value in kernel.items():
        if not (metric.startswith("smsp__average_warp") and "issue_stalled_" in metric):
            continue
        reason = metric.split("issue_stalled_", 1)[1].split(".")[0].removesuffix("_per_issue_active")
        cycles = number(value)
        if reason not in NOT_A_STALL and cycles is not None:
            stalls.append((cycles, reason))
    return ", ".join(f"{reason} {cycles:.1f}" for cycles, reason in sorted(stalls, reverse=True)[:count]) or "n/a"


def _shown(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


TABLE_HEADER = (
    "| case | kernel | grid | registers | time (us) | DRAM MB | DRAM GB/s | DRAM % | L2 % | SM % | occupancy % "
    "| top stalls (cycles per issued instruction) |"
)


def table_row(case_name: str, kernel: dict[str, str]) -> str:
    nanoseconds = number(kernel.get("gpu__time_duration.sum"))
    moved = [number(kernel.get(metric)) for metric in NCU_EXTRA_METRICS]
    dram_bytes = sum(moved) if None not in moved else None
    rate = dram_bytes / nanoseconds if dram_bytes is not None and nanoseconds else None  # bytes/ns = GB/s
    grid = kernel.get("launch__grid_size", "n/a")
    cells = [
        case_name,
        f"`{kernel.get('Kernel Name', '?')}`",
        grid,
        kernel.get("launch__registers_per_thread", "n/a"),
        _shown(nanoseconds / 1e3 if nanoseconds is not None else None, 2),
        _shown(dram_bytes / 1e6 if dram_bytes is not None else None, 2),
        _shown(rate, 0),
        _shown(number(kernel.get("dram__throughput.avg.pct_of_peak_sustained_elapsed"))),
        _shown(number(kernel.get("lts__throughput.avg.pct_of_peak_sustained_elapsed"))),
        _shown(number(kernel.get("sm__throughput.avg.pct_of_peak_sustained_elapsed"))),
        _shown(number(kernel.get("sm__warps_active.avg.pct_of_peak_sustained_active"))),
        top_stalls(kernel),
    ]
    return "| " + " | ".join(cells) + " |"


def first_error(output: str) -> str:
    """ncu's first ==ERROR== line (no counter permission, no such metric, ...), else the output's last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("==ERROR==")]
    return (errors or lines or ["no output"])[0 if errors else -1][:300]


def profile(ncu: str, case_name: str, timeout_s: float) -> tuple[list[dict[str, str]], str, str]:
    """(kernels, ncu's CSV text, why there are none): ncu run once, and once more without the extra metrics
    when this ncu does not know them, both within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    output = ""
    for extra_metrics in (True, False):
        left = deadline - time.monotonic()
        if not extra_metrics and left < RETRY_MIN_S:
            return [], output, f"{first_error(output)} (no time left to retry without the extra metrics)"
        # A session of its own: on a timeout the profiled python process (ncu's child, holding a CUDA context) is
        # killed with ncu, not left running into the next case. Being outside our process group, it does not get
        # a terminal's Ctrl-C or make bench-gpu's stop either: an interrupt here kills it before it goes on.
        process = subprocess.Popen(
            ncu_command(ncu, case_name, extra_metrics), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return [], "", f"stopped after {timeout_s:.0f} s"
        except BaseException:  # KeyboardInterrupt, SystemExit from a signal handler
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        output = stdout + stderr
        kernels = parse_raw_csv(stdout)
        if kernels:
            return kernels, stdout, ""
        if "Failed to find metric" not in output:
            break
    return [], output, first_error(output)


def report(
    case_names: list[str], budget_s: float, ncu: str | None, emit: Callable[[str], None] = lambda line: None
) -> tuple[list[str], str]:
    """The Markdown lines of the counters section, and every case's CSV one after the other. Each line is also
    given to ``emit`` as soon as it is known: a run stopped by its caller's budget keeps the cases done."""
    lines: list[str] = []

    def add(*new: str) -> None:
        lines.extend(new)
        for line in new:
            emit(line)

    if ncu is None:
        add(f"Kernel counters: not run: {NO_NCU}")
        return lines, ""
    add(TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|")
    notes, csv_text = [], []
    deadline = time.monotonic() + budget_s
    for name in case_names:
        left = deadline - time.monotonic()
        if left < 15:
            notes.append(f"- {name}: not run ({budget_s:.0f} s budget spent)")
            continue
        kernels, text, problem = profile(ncu, name, min(left, CASE_TIMEOUT_S))
        csv_text.append(f"# {name}\n{text}")
        if problem:
            notes.append(f"- {name}: no counters: {problem}")
            if any(error in problem for error in FAILS_EVERY_CASE):
                rest = case_names[case_names.index(name) + 1 :]
                notes += [f"- {later}: not run (ncu fails on every case: see above)" for later in rest]
                break
        add(*(table_row(name, kernel) for kernel in kernels))
    if notes:
        add("", *notes)
    return lines, "\n".join(csv_text)


# --------------------------------------------------------------------------------------------- the profiled process


def _published_sizes() -> tuple[int, int, float, float]:
    """(H, R, the adapters' LayerNorm eps, the shared layer's LayerNorm eps) of the published MiniALBERT."""
    from fastmini.baselines.original import PUBLISHED_MINIALBERT_128
    from fastmini.models.configuration import MINIALBERT_FIXED_LAYER_NORM_EPS, FastMiniConfig

    config = FastMiniConfig(**PUBLISHED_MINIALBERT_128)
    return config.hidden_size, config.adapter_size, MINIALBERT_FIXED_LAYER_NORM_EPS, config.layer_norm_eps


def case_step(case: Case, device):
    """The call a case profiles, ready to run (inputs made, settings applied)."""
    import importlib

    import torch

    from fastmini.ops import adapter_bottleneck, add_layer_norm, add_layer_norm_adapter

    for module, name, value in case.settings:
        setattr(importlib.import_module(f"fastmini.{module}"), name, value)
    hidden, bottleneck, adapter_eps, layer_norm_eps = _published_sizes()
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(*shape, scale=1.0, shift=0.0):
        values = torch.randn(shape, device=device, generator=generator) * scale + shift
        return values.to(torch.bfloat16).requires_grad_(case.backward)

    x = tensor(case.rows, hidden)
    norm = (tensor(hidden, scale=0.1, shift=1.0), tensor(hidden, scale=0.1))  # a LayerNorm's weight and bias
    if case.op == "add_layer_norm":
        inputs = (x, tensor(case.rows, hidden), *norm)

        def call():
            return add_layer_norm(*inputs, layer_norm_eps, backend="triton")
    else:
        parameters = (
            tensor(bottleneck, hidden, scale=hidden**-0.5), tensor(bottleneck, scale=0.1),
            tensor(hidden, bottleneck, scale=bottleneck**-0.5), tensor(hidden, scale=0.1), *norm,
        )  # fmt: skip
        if case.op == "adapter_bottleneck":
            inputs = (x, *parameters)

            def call():
                return adapter_bottleneck(*inputs, adapter_eps, backend="triton")
        else:  # add_layer_norm_adapter: the residual, the LayerNorm before the adapter, the adapter
            inputs = (x, tensor(case.rows, hidden), *norm, *parameters)

            def call():
                return add_layer_norm_adapter(*inputs[:4], layer_norm_eps, *parameters, adapter_eps, backend="triton")

    if not case.backward:

        def forward():
            with torch.inference_mode():
                return call()

        return forward
    grad_output = torch.randn(case.rows, hidden, device=device, generator=generator).to(torch.bfloat16)
    return lambda: torch.autograd.grad(call(), inputs, grad_output)


def drive(case_name: str) -> None:
    """Runs in the process ncu starts: warm-up calls, then the one call between the profiler's start and stop."""
    import torch

    step = case_step(CASES[case_name], torch.device("cuda"))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"cases to profile (default all): {', '.join(CASES)}")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget of all cases together")
    parser.add_argument("--driver", metavar="CASE", help=argparse.SUPPRESS)  # the process ncu profiles
    arguments = parser.parse_args(argv)
    named = [*arguments.cases, *([arguments.driver] if arguments.driver else [])]
    unknown = [name for name in named if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected some of: {', '.join(CASES)}")
    if arguments.driver:
        drive(arguments.driver)
        return 0
    _lines, csv_text = report(
        arguments.cases or list(CASES), arguments.budget_s, find_ncu(), emit=lambda line: print(line, flush=True)
    )
    if os.environ.get("OUT") and csv_text:
        (Path(os.environ["OUT"]) / "counters.csv").write_text(csv_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
