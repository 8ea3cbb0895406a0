"""`make bench-gpu`: the GPU tests and every benchmark in one call, written up as Markdown.

Runs on the lent GPU machine (its own python3 with torch/triton/transformers installed):
``pytest -m gpu tests/`` then the GPU benchmarks (``GPU_BENCHMARKS``), and writes
``benchmarks/results/<date>-<gpu>.md`` with the versions, the GPU test outcome and one table
per benchmark group (medians, ratios against the baseline, GB/s or GFLOP/s as recorded).
Logs (gpu-tests.log, gpu-benchmarks.log) and benchmarks.json are written into $OUT as the runs go
when that variable is set (the device tool brings $OUT back, even after a timeout), and the
results file is copied there too.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The benchmarks with a CUDA part; the CPU-only encoder benchmark would spend device time on the
# host's CPU (and test_distill_step.py runs its GPU setup alone where CUDA is present).
GPU_BENCHMARKS = [
    "benchmarks/test_adapter_bottleneck.py",
    "benchmarks/test_add_layer_norm.py",
    "benchmarks/test_linear_gelu.py",
    "benchmarks/test_encoder_forward_gpu.py",
    "benchmarks/test_distill_step.py",
]


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


def per_test_timeout(seconds: int) -> list[str]:
    """pytest-timeout's limit where the plugin is installed: a hung capture or kernel fails one test,
    not the whole call."""
    return [f"--timeout={seconds}"] if importlib.util.find_spec("pytest_timeout") else []


def run(arguments: list[str], log: Path) -> tuple[int, str]:
    """pytest with its output streamed into ``log`` as it runs."""
    with log.open("w") as stream:
        result = subprocess.run(pytest_command() + arguments, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    output = log.read_text()
    print(output[-6000:], flush=True)
    return result.returncode, output


def summary_line(output: str) -> str:
    lines = [line for line in output.splitlines() if re.search(r"\b(passed|failed|skipped|error)", line)]
    return lines[-1].strip("= ") if lines else "no summary"


def benchmark_rows(report: dict) -> list[str]:
    rows = ["| benchmark | median (ms) | details |", "|---|---|---|"]
    for bench in report.get("benchmarks", []):
        info = {k: v for k, v in bench.get("extra_info", {}).items() if k not in ("device",)}
        details = "; ".join(f"{k}: {v}" for k, v in info.items())
        rows.append(f"| {bench['name']} | {bench['stats']['median'] * 1e3:.4f} | {details} |")
    return rows


def main() -> int:
    import torch
    import transformers

    if not torch.cuda.is_available():
        print("bench-gpu needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    gpu = torch.cuda.get_device_name(0)
    logs = log_directory()
    tests_code, tests_output = run(
        ["-m", "gpu", "tests/", "-q", "-rfEs", "-p", "no:cacheprovider", *per_test_timeout(180)], logs / "gpu-tests.log"
    )
    json_path = logs / "benchmarks.json"
    bench_code, bench_output = run(
        [*GPU_BENCHMARKS, "--benchmark-only", "-q", "-p", "no:cacheprovider", f"--benchmark-json={json_path}",
         *per_test_timeout(300)],
        logs / "gpu-benchmarks.log",
    )  # fmt: skip
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    today = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    lines = [
        f"# fastmini GPU results, {today}, {gpu}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
        f"CUDA {torch.version.cuda}. Produced by `make bench-gpu` (benchmarks/run_gpu.py).",
        "",
        f"GPU tests (`pytest -m gpu tests/`): {summary_line(tests_output)} (exit {tests_code})",
        f"Benchmarks (`pytest {' '.join(GPU_BENCHMARKS)} --benchmark-only`): {summary_line(bench_output)} "
        f"(exit {bench_code})",
        "",
        *benchmark_rows(report),
        "",
    ]
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    target = results / f"{today}-{slug}.md"
    target.write_text("\n".join(lines))
    print(f"wrote {target}")
    if os.environ.get("OUT"):  # the device tool brings $OUT back: the results beside both logs and the JSON
        shutil.copy(target, logs / target.name)
    return tests_code or bench_code


if __name__ == "__main__":
    sys.exit(main())
