"""Every Triton kernel launch of a sweep, compiled for an H100/H200 (sm_90) without a GPU: what each one needs.

``python benchmarks/kernel_resources.py`` (on any machine with the triton wheel: its ptxas and cuobjdump do
the work, no GPU or driver) prints, for each distinct launch the fused ops make at the published sizes
(H=768, R=48; bf16 and fp32; the GPU tile sweeps' candidates included), the registers a thread
needs, the bytes it spills to local memory (``STACK``; 0 is what a kernel should have) and the shared memory
of a block, and the warps an SM can keep in flight with them (65536 registers a SM: 255 a thread allows one
block of 8 warps), so a launch that spills or keeps few warps is where a GPU sweep should look first.

How: the sweep runs under the Triton interpreter (``TRITON_INTERPRET=1``) with the interpreter's launch
recorded, not run; each distinct (kernel, argument types, constexprs, num_warps, num_stages) is then
compiled by Triton's CUDA backend in a subprocess without the interpreter (the kernels take their GPU code
paths there). tests/test_kernels_compile_for_hopper.py uses the same machinery to check that every launch
builds; this script reports what the builds need.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import torch

POINTER_TYPES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}

# Runs in a subprocess without TRITON_INTERPRET: reads specs (JSON) on stdin, prints one outcome per spec.
COMPILER = r"""
import json, os, re, subprocess, sys, tempfile
from concurrent.futures import ProcessPoolExecutor

def resources(cubin):
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return {"registers": int(found.group(1)), "spill_bytes": int(found.group(2))} if found else {}

def compile_one(spec):
    import importlib
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    names = list(spec["signature"])
    constexprs = {}
    for name, value in spec["constexprs"].items():
        constexprs[(names.index(name),)] = tl.dtype(value["dtype"]) if isinstance(value, dict) else value
    attrs = {(names.index(name),): [["tt.divisibility", spec["alignment"]]] for name in spec["aligned"]}
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=spec["signature"], constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options=spec["options"],
        )
        return {"ok": True, "shared": compiled.metadata.shared, **resources(compiled.asm["cubin"])}
    except Exception as error:
        return {"ok": False, "error": f"{type(error).__name__}: {str(error)[:2000]}"}

if __name__ == "__main__":
    specs = json.load(sys.stdin)
    with ProcessPoolExecutor(max_workers=2) as pool:
        print(json.dumps(list(pool.map(compile_one, specs))))
"""


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    import triton

    annotation = parameter.annotation
    return annotation == "tl.constexpr" or annotation is triton.language.constexpr


# Triton's JIT specialises every pointer whose address and every integer whose value is a multiple of 16 as
# such ("tt.divisibility"), and its compiler vectorises loads and pipelines loops only where it knows that
# alignment. A build without these attributes is another kernel: compiled so, the adapter's forward loaded
# every element by itself (ld.global.b16) and ran no cp.async pipeline.
_JIT_ALIGNMENT = 16


def launch_spec(fn, args: tuple, kwargs: dict) -> dict:
    """The kernel's argument types, constexpr values and the JIT's alignment attributes, as ASTSource takes them
    (JSON-able; ``aligned``: the arguments a launch with these values specialises as multiples of 16)."""
    import triton

    parameters = inspect.signature(fn).parameters
    bound = {**dict(zip(parameters, args, strict=False)), **{k: v for k, v in kwargs.items() if k in parameters}}
    signature, constexprs, aligned = {}, {}, []
    for name, parameter in parameters.items():
        value = bound.get(name, parameter.default)
        if _is_constexpr(parameter) or value is None:
            signature[name] = "constexpr"
            constexprs[name] = {"dtype": value.name} if isinstance(value, triton.language.dtype) else value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
            if value.data_ptr() % _JIT_ALIGNMENT == 0:
                aligned.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % _JIT_ALIGNMENT == 0:
                aligned.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of unexpected type {type(value).__name__}")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return {
        "module": fn.__module__,
        "name": fn.__name__,
        "signature": signature,
        "constexprs": constexprs,
        "aligned": aligned,
        "alignment": _JIT_ALIGNMENT,
        "options": options,
    }


def record_launches(monkeypatch, sweep: Callable, execute: bool = True) -> list[dict]:
    """The distinct launches ``sweep(patch)`` makes under the interpreter; with ``execute`` False they are
    recorded, not run (for launch choices the interpreter cannot run, e.g. bf16 tl.dot operands or TF32
    precision). ``monkeypatch`` is pytest's (``pytest.MonkeyPatch()`` outside a test)."""
    from triton.runtime.interpreter import InterpretedFunction

    specs: dict[str, dict] = {}
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = launch_spec(self.fn, args, kwargs)
        specs.setdefault(json.dumps(spec, sort_keys=True), spec)
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

    with monkeypatch.context() as patch:
        patch.setattr(InterpretedFunction, "run", recording_run)
        sweep(patch)
    return list(specs.values())


# The Python whose triton compiles the launches: this one's unless named. The GPU machine's triton is older than
# the one CI installs, and the two compilers accept different code (triton 3.6 refuses a @triton.jit helper that
# returns None, which 3.9 and the interpreter take); an environment with the GPU machine's triton version (and
# this one's torch on its path) names it here to check the kernels build there too, without a GPU.
COMPILER_PYTHON_VARIABLE = "FASTMINI_SM90_COMPILER_PYTHON"


def compiler_python() -> str:
    return os.environ.get(COMPILER_PYTHON_VARIABLE) or sys.executable


def compile_for_sm90(specs: list[dict], cache_dir: str, python: str | None = None) -> list[dict]:
    """Compile every spec for sm_90 in a subprocess without the interpreter, by ``python``'s triton
    (compiler_python() unless given): one outcome per spec, {"ok", "shared"} and, where the triton wheel has
    cuobjdump, "registers" and "spill_bytes"; or {"ok": False, "error"}."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache_dir
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is today's default
    result = subprocess.run(
        [python or compiler_python(), "-c", COMPILER],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"compiling for sm_90 failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# Per SM on sm_90: 64K 32-bit registers (allocated per warp in units of 256), 228 KB of shared memory (1 KB of it
# reserved per block), at most 32 blocks and 64 warps.
_REGISTERS_PER_SM, _REGISTER_UNIT, _SHARED_PER_SM, _SHARED_PER_BLOCK_RESERVED = 65536, 256, 228 * 1024, 1024
_MAX_BLOCKS_PER_SM, _MAX_WARPS_PER_SM = 32, 64


def resident_warps(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Warps an sm_90 SM keeps in flight for a kernel: whole blocks, as many as its registers, shared memory and
    the per-SM limits allow (the occupancy calculator's rule, without its rarer limits)."""
    per_warp = -(-registers * 32 // _REGISTER_UNIT) * _REGISTER_UNIT
    by_registers = _REGISTERS_PER_SM // (per_warp * num_warps)
    by_shared = _SHARED_PER_SM // (shared_bytes + _SHARED_PER_BLOCK_RESERVED)
    blocks = min(by_registers, by_shared, _MAX_BLOCKS_PER_SM, _MAX_WARPS_PER_SM // num_warps)
    return blocks * num_warps


@contextlib.contextmanager
def _interpreter() -> Iterator[None]:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _published_sweep(patch) -> None:
    """The adapter and add_layer_norm launches at the published sizes as an H100/H200 makes them: 16384 rows, and
    128 with the few-rows tiles a GPU picks there; bf16 (every tile candidate and backward design) and fp32;
    add_layer_norm with dropout under each RNG scheme. CPU tensors, recorded, never run."""
    from fastmini.kernels import adapter_bottleneck as adapter
    from fastmini.kernels import add_layer_norm

    patch.setattr(adapter, "_input_precision", lambda x: "tf32x3" if x.dtype == torch.float32 else "ieee")
    # The row groups a GPU's 132 SMs get: the real rule, as on a CUDA device (on the CPU it returns a stand-in 2).
    row_groups = adapter._row_groups
    patch.setattr(adapter, "streaming_multiprocessors", lambda device: 132)
    patch.setattr(
        adapter, "_row_groups", lambda device, *args, **options: row_groups(torch.device("cuda"), *args, **options)
    )
    patch.setattr(add_layer_norm, "streaming_multiprocessors", lambda device: 132)
    for dtype in (torch.bfloat16, torch.float32):
        size = 2 if dtype == torch.bfloat16 else 4
        for rows in (16384, 128):
            x = torch.zeros(rows, 768, dtype=dtype)
            weights = [
                torch.zeros(shape, dtype=dtype) for shape in ((48, 768), (48,), (768, 48), (768,), (768,), (768,))
            ]
            saved = [torch.zeros(rows, dtype=torch.float32) for _ in range(2)]
            h = torch.zeros(rows, 48, dtype=torch.float32)
            few_rows = {"BLOCK_M": 16, **adapter.FORWARD_FEW_ROWS_TILES[size]} if rows < 132 * 64 else {}
            candidates = adapter.FORWARD_TILE_CANDIDATES.values() if size == 2 else ({},)
            for tiles in candidates:  # as _tiles on a GPU: a candidate that names BLOCK_M keeps the rest default
                launch = tiles if "BLOCK_M" in tiles or "kernel" in tiles else {**few_rows, **tiles}
                adapter.adapter_bottleneck_forward(x, *weights, 1e-12, True, tiles=launch)
            # the shared layer's residual + LayerNorm folded in (ops.add_layer_norm_adapter), both forward kernels
            pre_norm = (x, weights[3], weights[4], 1e-12)
            capped = {**few_rows, "BLOCK_K": adapter.PRE_NORM_WIDEST_CHUNK} if few_rows else {}  # as the launcher caps
            for tiles in (capped, {"kernel": "rows"}) if size == 2 else ({},):
                adapter.adapter_bottleneck_forward(x, *weights, 1e-12, False, tiles=tiles, pre_norm=pre_norm)
            for options in adapter.BACKWARD_TILE_CANDIDATES.values() if size == 2 and rows > 128 else ({},):
                adapter.adapter_bottleneck_backward(x, x, *weights, h, *saved, **options)
            for scheme in add_layer_norm.DROPOUT_RNG_SCHEMES:
                patch.setattr(add_layer_norm, "DROPOUT_RNG", scheme)
                add_layer_norm.add_layer_norm_forward(x, x, weights[3], weights[4], 1e-12, 0.1, 7, True)
                add_layer_norm.add_layer_norm_backward(x, x, weights[3], *saved, 0.1, 7)
            patch.setattr(add_layer_norm, "DROPOUT_RNG", add_layer_norm.DROPOUT_RNG_SCHEMES[0])
            add_layer_norm.add_layer_norm_forward(x, x, weights[3], weights[4], 1e-12, 0.0, 7, True)
            for options in add_layer_norm.BACKWARD_CANDIDATES.values() if size == 2 and rows > 128 else ({},):
                add_layer_norm.add_layer_norm_backward(x, x, weights[3], *saved, 0.0, 7, **options)


_VARIANT_SWITCHES = ("STASH_Z", "PRE_NORM")  # the adapter forward's code variants: named in a row when on


def main() -> None:
    import tempfile

    import pytest

    with _interpreter():
        specs = record_launches(pytest.MonkeyPatch(), _published_sweep, execute=False)
    with tempfile.TemporaryDirectory() as cache:
        outcomes = compile_for_sm90(specs, cache)
    header = f"{'kernel':32s} {'activation, tiles':52s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spill B':>8s}"
    print(header + f" {'smem KB':>8s} {'warps/SM':>8s}")
    for spec, outcome in sorted(zip(specs, outcomes, strict=True), key=lambda pair: pair[0]["name"]):
        tiles = {
            k: v
            for k, v in spec["constexprs"].items()
            if k.startswith("BLOCK") or k in ("ROWS", "HAS_DROPOUT", "FOUR_PER_CALL") or (k in _VARIANT_SWITCHES and v)
        }
        activation = spec["signature"].get("x_ptr") or spec["signature"].get("grad_out_ptr") or ""
        label = f"{activation.lstrip('*')} " + " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in tiles.items())
        if not outcome["ok"]:
            print(f"{spec['name']:32s} {label:52s} failed: {outcome['error'][:200]}")
            continue
        options = spec["options"]
        print(
            f"{spec['name']:32s} {label:52s} {options.get('num_warps', 4):5d} {options.get('num_stages', 3):6d} "
            f"{outcome.get('registers', '?'):>5} {outcome.get('spill_bytes', '?'):>8} {outcome['shared'] / 1024:8.1f} "
            f"{resident(outcome, options.get('num_warps', 4)):>8}"
        )


def resident(outcome: dict, num_warps: int) -> str:
    if "registers" not in outcome:
        return "?"
    return str(resident_warps(outcome["registers"], num_warps, outcome["shared"]))


if __name__ == "__main__":
    main()
