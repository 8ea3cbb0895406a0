"""L2 persistence (fastmini.runtime): parameter packing, window planning, source lookup and the
CPU-side errors here; the @pytest.mark.gpu tests build csrc/l2_persistence.cpp and apply, check
and remove windows on a stream and on captured CUDA graphs."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fastmini import FastMiniModel
from fastmini.runtime import (
    CudaGraphCapture,
    GraphedEncoder,
    l2_persistence,
    pack_parameters,
    persist_in_l2,
    plan_window,
)
from fastmini.runtime import extension as extension_module
from fastmini.runtime.extension import CSRC_ENV_VAR, csrc_directory, load_l2_extension
from fastmini.runtime.l2_persistence import _stream_handle, count_graph_window_nodes, l2_limits, persist_range_in_l2

# The persisting L2 set-aside is the device's: under bench-gpu's pytest-xdist workers these tests share one
# worker, so that no two of them change it at once.
pytestmark = pytest.mark.xdist_group("l2-persistence")

MB = 1 << 20


def tiny_model(tiny_config, randomize, device="cpu", dtype=torch.float32) -> FastMiniModel:
    return randomize(FastMiniModel(tiny_config(max_position_embeddings=64))).eval().to(device=device, dtype=dtype)


def ragged(batch, length, device="cpu"):
    generator = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(1, 99, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, length // 2 :] = 0
    return (ids * mask).to(device), mask.to(device)


# ---- packing ----------------------------------------------------------------------------------


def test_packing_the_shared_layer_keeps_outputs_and_parameters(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize)
    ids, mask = ragged(3, 9)
    with torch.no_grad():
        before = model(ids, mask).last_hidden_state
    layer = model.encoder.shared_layer
    parameters = list(layer.parameters())
    state = {k: v.clone() for k, v in layer.state_dict().items()}

    packed = pack_parameters(layer)

    assert list(layer.parameters()) == parameters  # the same Parameter objects
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in parameters)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key])
    base, end = packed.buffer.data_ptr(), packed.buffer.data_ptr() + packed.num_bytes
    # aligned in memory, not only from the buffer's start (the CPU allocator aligns to 64 bytes)
    assert all(base <= p.data_ptr() < end and p.data_ptr() % 256 == 0 for p in parameters)
    assert packed.intact()
    assert packed.num_bytes < sum(p.numel() for p in parameters) * 4 + len(parameters) * 256
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).last_hidden_state, before, rtol=0, atol=0)


def test_the_buffer_is_the_parameters_storage(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize)
    layer = model.encoder.shared_layer
    packed = pack_parameters(layer)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    ids, mask = ragged(2, 5)
    model(ids, mask).last_hidden_state.square().sum().backward()
    snapshot = packed.buffer.clone()
    optimizer.step()
    assert not torch.equal(packed.buffer, snapshot)  # the step wrote into the buffer
    offset = packed.offsets[0]
    first = packed.parameters[0]
    assert torch.equal(packed.buffer[offset : offset + first.numel()].view_as(first), first.detach())
    assert packed.intact()


def test_replacing_storage_breaks_the_layout_and_intact_says_so(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize)
    packed = pack_parameters(model.encoder.shared_layer)
    model.to(torch.float64)
    assert not packed.intact()


def test_tied_parameters_are_packed_once_and_an_iterable_works():
    shared = nn.Parameter(torch.randn(3, 5))
    other = nn.Parameter(torch.randn(7))
    packed = pack_parameters([shared, other, shared], alignment=16)
    assert packed.parameters == (shared, other) and packed.offsets == (0, 16)
    assert packed.buffer.numel() == 16 + 8


def test_packing_refuses_what_one_window_cannot_cover():
    with pytest.raises(ValueError, match="one device and dtype"):
        pack_parameters([nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="no parameters"):
        pack_parameters(nn.Module())
    with pytest.raises(ValueError, match="multiple of 4 bytes"):
        pack_parameters([nn.Parameter(torch.randn(2))], alignment=6)
    with pytest.raises(TypeError, match="expected parameters"):
        pack_parameters([1.0])


# ---- planning ---------------------------------------------------------------------------------


def test_a_window_smaller_than_the_set_aside_is_marked_entirely():
    plan = plan_window(14 * MB, max_window_bytes=128 * MB, max_persisting_bytes=30 * MB)
    assert (plan.window_bytes, plan.reserve_bytes, plan.hit_ratio) == (14 * MB, 14 * MB, 1.0)


def test_a_window_larger_than_the_set_aside_marks_only_what_fits():
    plan = plan_window(60 * MB, max_window_bytes=128 * MB, max_persisting_bytes=30 * MB)
    assert plan.reserve_bytes == 30 * MB and plan.hit_ratio == pytest.approx(0.5)
    plan = plan_window(200 * MB, max_window_bytes=128 * MB, max_persisting_bytes=32 * MB)
    assert plan.window_bytes == 128 * MB and plan.hit_ratio == pytest.approx(0.25)


def test_explicit_reservation_and_hit_ratio():
    plan = plan_window(20 * MB, 128 * MB, 30 * MB, hit_ratio=0.6, reserve_bytes=8 * MB)
    assert (plan.reserve_bytes, plan.hit_ratio) == (8 * MB, 0.6)
    assert plan_window(20 * MB, 128 * MB, 30 * MB, reserve_bytes=100 * MB).reserve_bytes == 30 * MB
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="hit_ratio"):
            plan_window(MB, 128 * MB, 30 * MB, hit_ratio=bad)
    with pytest.raises(ValueError, match="reserve_bytes"):
        plan_window(MB, 128 * MB, 30 * MB, reserve_bytes=0)
    with pytest.raises(ValueError, match="num_bytes"):
        plan_window(0, 128 * MB, 30 * MB)
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        plan_window(MB, 0, 0)


# ---- sources, build and CPU errors -------------------------------------------------------------


def test_the_source_is_found_in_the_checkout():
    assert (csrc_directory() / "l2_persistence.cpp").is_file()


def test_a_missing_source_directory_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CSRC_ENV_VAR, str(tmp_path))
    with pytest.raises(RuntimeError, match=f"l2_persistence.cpp not found.*{CSRC_ENV_VAR}"):
        csrc_directory()


def fake_toolkit(home: Path) -> Path:
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda.h").write_text("")
    (home / "lib64" / "stubs").mkdir(parents=True)
    (home / "lib64" / "stubs" / "libcuda.so").write_text("")
    return home


def test_driver_flags_need_the_toolkit_headers(tmp_path, monkeypatch):
    monkeypatch.setattr(extension_module, "FALLBACK_CUDA_HOMES", (str(tmp_path / "nowhere"),))
    with pytest.raises(RuntimeError, match="CUDA_HOME"):
        extension_module._driver_flags(None)
    with pytest.raises(RuntimeError) as refused:
        extension_module._driver_flags(str(tmp_path))
    assert f"not found (tried {tmp_path}/include/cuda.h, {tmp_path}/nowhere/include/cuda.h)" in str(refused.value)
    home = fake_toolkit(tmp_path / "toolkit")
    includes, ldflags = extension_module._driver_flags(str(home))
    assert includes == [str(home / "include")]
    assert ldflags == [f"-L{home / 'lib64' / 'stubs'}", "-lcuda"]


def test_driver_flags_find_the_toolkit_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    # torch's CUDA_HOME is `which nvcc`/../..: a wrapper script in /usr/local/bin makes it /usr/local
    toolkit = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setattr(extension_module, "FALLBACK_CUDA_HOMES", (str(toolkit),))
    includes, _ = extension_module._driver_flags(str(tmp_path / "usr-local"))
    assert includes == [str(toolkit / "include")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_on_a_cpu_everything_fails_clearly_and_builds_nothing(tmp_path):
    probe = """
import sys, torch
from fastmini.runtime import persist_in_l2
from fastmini.runtime.extension import load_l2_extension
for call in (lambda: persist_in_l2(torch.zeros(4)), load_l2_extension):
    try:
        call()
    except RuntimeError as error:
        print(type(error).__name__, "CUDA" in str(error))
print("torch.utils.cpp_extension" in sys.modules, torch.cuda.is_initialized())
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.split() == ["RuntimeError", "True", "RuntimeError", "True", "False", "False"]


def test_bad_buffers_are_refused_before_any_build():
    with pytest.raises(TypeError, match="expected a tensor"):
        persist_in_l2([1, 2, 3])
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        persist_in_l2(torch.zeros(8))


def test_the_default_stream_cannot_carry_a_window():
    with pytest.raises(ValueError, match="legacy NULL stream"):
        _stream_handle(FakeStream(0, 0), torch.device("cuda", 0))


# ---- the window's bookkeeping, against a fake extension ------------------------------------------


class FakeExtension:
    """Records what the Python side asks of csrc/l2_persistence.cpp (same functions, same clamping)."""

    def __init__(self, max_persisting=30 * MB, max_window=128 * MB, limit=0, grant=None):
        self.max_persisting, self.max_window, self.limit, self.grant = max_persisting, max_window, limit, grant
        self.calls = []

    def device_limits(self, device):
        return {
            "l2_cache_bytes": 50 * MB,
            "max_persisting_l2_bytes": self.max_persisting,
            "max_window_bytes": self.max_window,
            "persisting_l2_limit_bytes": self.limit,
        }

    def set_persisting_l2_limit(self, device, num_bytes):
        self.calls.append(("limit", device, num_bytes))
        self.limit = min(num_bytes, self.max_persisting) if self.grant is None else self.grant
        return self.limit

    def set_stream_window(self, device, stream, base, num_bytes, hit_ratio):
        if stream == 13:
            raise RuntimeError("cuStreamSetAttribute failed")
        self.calls.append(("stream", device, stream, base, num_bytes, hit_ratio))
        return num_bytes

    def set_graph_window(self, device, graph, base, num_bytes, hit_ratio):
        self.calls.append(("graph", device, graph, base, num_bytes, hit_ratio))
        return 7

    def reset_persisting_lines(self, device):
        self.calls.append(("reset", device))


class FakeStream:
    def __init__(self, handle, device_index):
        self.cuda_stream = handle
        self.device = torch.device("cuda", device_index)


@pytest.fixture
def fake_extension(monkeypatch):
    ext = FakeExtension(limit=2 * MB)
    monkeypatch.setattr(l2_persistence, "load_l2_extension", lambda: ext)
    monkeypatch.setattr(l2_persistence, "_live_windows", {})  # windows a test leaves live stay with it
    return ext


def test_a_window_reserves_applies_and_gives_everything_back(fake_extension):
    stream = FakeStream(5, 1)
    with persist_range_in_l2(1, 4096, 10 * MB, stream=stream) as window:
        assert window.device == torch.device("cuda", 1)
        assert (window.plan.window_bytes, window.plan.hit_ratio, window.reserved_bytes) == (10 * MB, 1.0, 10 * MB)
        assert window.apply_to_graph(99) == 7
        window.apply_to_stream(FakeStream(6, 1))
    assert fake_extension.calls == [
        ("limit", 1, 10 * MB),
        ("stream", 1, 5, 4096, 10 * MB, 1.0),
        ("graph", 1, 99, 4096, 10 * MB, 1.0),
        ("stream", 1, 6, 4096, 10 * MB, 1.0),
        ("stream", 1, 5, 0, 0, 0.0),  # windows cleared
        ("stream", 1, 6, 0, 0, 0.0),
        ("reset", 1),  # persisting lines demoted
        ("limit", 1, 2 * MB),  # the previous limit restored
    ]
    window.remove()
    assert len(fake_extension.calls) == 8  # removing twice does nothing
    with pytest.raises(RuntimeError, match="already removed"):
        window.apply_to_graph(1)


def test_a_second_live_window_on_a_device_is_refused_until_the_first_goes(fake_extension):
    """Two windows would share the context's one limit: the second would shrink the first's set-aside, and
    removing either would reset both's persisting lines and restore a limit the other still needs."""
    first = persist_range_in_l2(0, 4096, 10 * MB)
    calls = list(fake_extension.calls)
    with pytest.raises(RuntimeError, match=r"cuda:0 already has a live L2 window \(10485760 bytes at 0x1000\)"):
        persist_range_in_l2(0, 8192, 4 * MB)
    assert fake_extension.calls == calls and fake_extension.limit == 10 * MB  # nothing changed
    with persist_range_in_l2(1, 8192, 4 * MB):  # another device has its own context
        pass
    first.remove()
    assert fake_extension.limit == 2 * MB  # the limit from before the first window
    with persist_range_in_l2(0, 8192, 4 * MB) as second:
        assert second.reserved_bytes == 4 * MB


def test_a_window_whose_object_was_lost_can_be_found_and_removed(fake_extension):
    """Its reservation outlives the object (the live-window registry holds it): without a way back to it, no
    window could be set on that device until the process ended."""
    import gc

    from fastmini.runtime import live_l2_window

    persist_range_in_l2(0, 4096, 10 * MB)  # the caller drops it
    gc.collect()
    with pytest.raises(RuntimeError, match=r"live_l2_window\(device\) gives it back"):
        persist_range_in_l2(0, 8192, 4 * MB)
    lost = live_l2_window(0)
    assert lost is not None and lost.base_ptr == 4096 and live_l2_window(1) is None
    lost.remove()
    assert live_l2_window("cuda:0") is None and fake_extension.limit == 2 * MB
    persist_range_in_l2(0, 8192, 4 * MB).remove()


def test_the_build_name_follows_the_source_and_flags(tmp_path):
    """torch rebuilds across processes by file times alone: one fixed name loaded an older build for a changed
    source whose file time was older (a tarball, cp -p), or another checkout's build."""
    from fastmini.runtime.extension import build_name

    source = tmp_path / "a.cpp"
    source.write_text("int a;")
    name = build_name("stem", source, ["-O2"])
    assert name.startswith("stem_") and name == build_name("stem", source, ["-O2"])
    assert build_name("stem", source, ["-O3"]) != name
    source.write_text("int b;")
    assert build_name("stem", source, ["-O2"]) != name


def test_a_lock_left_by_a_killed_build_does_not_stop_the_next(tmp_path):
    """torch's O_EXCL lock file stays behind when its builder is killed (torchrun's SIGTERM): every later first
    use waited on it forever. Under fastmini's flock, which dies with its holder, a leftover one goes."""
    from fastmini.runtime.extension import _exclusive_build

    build = tmp_path / "fastmini_l2_persistence_0123"
    build.mkdir()
    (build / "lock").write_text("")
    with _exclusive_build(build):
        assert not (build / "lock").exists()


def test_a_smaller_grant_lowers_the_hit_ratio(fake_extension):
    fake_extension.grant = 5 * MB
    window = persist_range_in_l2(0, 4096, 20 * MB)
    assert window.reserved_bytes == 5 * MB and window.plan.hit_ratio == pytest.approx(0.25)
    assert [call[0] for call in fake_extension.calls] == ["limit"]  # no stream given, none touched


def test_a_refused_reservation_warns(fake_extension):
    fake_extension.grant = 0
    with pytest.warns(RuntimeWarning, match="MIG and MPS"):
        persist_range_in_l2(0, 4096, MB)


def test_a_failing_stream_gives_the_reservation_back(fake_extension):
    with pytest.raises(RuntimeError, match="cuStreamSetAttribute"):
        persist_range_in_l2(0, 4096, MB, stream=FakeStream(13, 0))
    assert fake_extension.calls[-2:] == [("reset", 0), ("limit", 0, 2 * MB)]


def test_the_default_stream_is_refused_before_anything_changes(fake_extension):
    with pytest.raises(ValueError, match="legacy NULL stream"):
        persist_range_in_l2(0, 4096, MB, stream=FakeStream(0, 0))
    assert fake_extension.calls == []


def test_a_stream_of_another_device_is_refused_before_anything_changes(fake_extension):
    with pytest.raises(ValueError, match="the window is on cuda:0, the stream on cuda:1"):
        persist_range_in_l2(0, 4096, MB, stream=FakeStream(5, 1))
    assert fake_extension.calls == []
    with persist_range_in_l2(1, 4096, MB) as window:
        with pytest.raises(ValueError, match="the window is on cuda:1, the stream on cuda:0"):
            window.apply_to_stream(FakeStream(5, 0))
        assert [call[0] for call in fake_extension.calls] == ["limit"]


# ---- on a GPU ---------------------------------------------------------------------------------

needs_l2 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA device of compute capability 8.0 or newer",
)
NO_SET_ASIDE = "this device/context offers no persisting L2 (MIG or MPS?): nothing to reserve"


@pytest.fixture
def persisting_l2() -> dict[str, int]:
    """The device's limits, after building the extension; skips where no set-aside is possible."""
    limits = l2_limits()
    if limits["max_persisting_l2_bytes"] == 0:
        pytest.skip(NO_SET_ASIDE)
    return limits


@pytest.mark.gpu
@needs_l2
def test_the_extension_builds_and_reports_the_devices_limits():
    ext = load_l2_extension()
    assert load_l2_extension() is ext  # built once per process
    limits = l2_limits()
    assert limits["l2_cache_bytes"] > 0
    assert 0 <= limits["max_persisting_l2_bytes"] <= limits["l2_cache_bytes"]
    assert limits["max_window_bytes"] > 0
    assert limits["persisting_l2_limit_bytes"] >= 0
    print(f"L2 limits on {torch.cuda.get_device_name()}: {limits}")


@pytest.mark.gpu
@needs_l2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_window_over_the_shared_layer_applies_and_is_removed(tiny_config, randomize, dtype, persisting_l2):
    model = tiny_model(tiny_config, randomize, "cuda", dtype)
    ids, mask = ragged(4, 16, "cuda")
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
    packed = pack_parameters(model.encoder.shared_layer)
    before = persisting_l2["persisting_l2_limit_bytes"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    # The tiny layer is ~40 KB; reserve a few MB so no set-aside granularity can round it to nothing.
    window = persist_in_l2(packed.buffer, stream=stream, reserve_bytes=4 * MB)
    with window, torch.cuda.stream(stream), torch.no_grad():
        assert window.plan.window_bytes == packed.num_bytes and window.plan.hit_ratio == 1.0
        assert window.reserved_bytes > 0
        assert l2_limits()["persisting_l2_limit_bytes"] == window.reserved_bytes
        out = model(ids, mask).last_hidden_state
    torch.cuda.synchronize()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # a cache policy changes no result; streams may pick kernels
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    assert not window.active
    assert l2_limits()["persisting_l2_limit_bytes"] == before
    window.remove()  # idempotent
    with pytest.raises(RuntimeError, match="already removed"):
        window.apply_to_stream(stream)


@pytest.mark.gpu
@needs_l2
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_kernel_nodes_get_the_window(
    tiny_config, randomize, persisting_l2, backend, monkeypatch, triton_launches
):
    """Torch's kernels and the Triton kernels (CUDA's choice once verified) alike: every kernel node gets it."""
    monkeypatch.setenv("FASTMINI_BACKEND", backend)
    model = tiny_model(tiny_config, randomize, "cuda", torch.bfloat16)
    fn = lambda ids, mask: model.encode(ids, mask, unpad=False).sequence  # noqa: E731
    packed = pack_parameters(model.encoder.shared_layer)
    counts = []
    with persist_in_l2(packed.buffer, reserve_bytes=4 * MB) as window:

        def hook(raw_graph: int) -> None:
            window.apply_to_graph(raw_graph)
            counts.append(count_graph_window_nodes(raw_graph, window.base_ptr))

        encoder = GraphedEncoder(
            fn, batch_buckets=(4,), sequence_buckets=(16,), capture=CudaGraphCapture(graph_hook=hook)
        )
        ids, mask = ragged(3, 12, "cuda")
        out = encoder(ids, mask)
        launched = dict(triton_launches)  # by the warm-up and the capture: the graph holds those kernels' nodes
        with torch.no_grad():
            expected = fn(ids, mask)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    kernels, windowed = counts[0]
    assert kernels > 0 and windowed == kernels
    if backend == "triton":
        assert all(launched.values()), launched
    else:
        assert not any(launched.values()), launched
    torch.testing.assert_close(encoder(ids, mask), out, rtol=1e-6, atol=1e-6)  # replays after the window is gone


@pytest.mark.gpu
@needs_l2
def test_record_whether_stream_capture_copies_the_streams_window(persisting_l2):
    """Informational: the CUDA docs say capture copies a stream's priority into kernel nodes but
    are silent on its access-policy window; this records what the driver does (printed and warned)."""
    buffer = torch.randn(1 << 16, device="cuda")
    x = torch.randn(256, 256, device="cuda")
    stream = torch.cuda.Stream()
    with persist_in_l2(buffer, stream=stream, reserve_bytes=4 * MB) as window:
        graph = torch.cuda.CUDAGraph(keep_graph=True)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: cuBLAS sets itself up outside the capture
            x @ x + buffer[:256]
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            y = x @ x + buffer[:256]
        kernels, windowed = count_graph_window_nodes(graph.raw_cuda_graph(), window.base_ptr)
        graph.instantiate()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(y, x @ x + buffer[:256])
    assert kernels > 0
    finding = f"stream capture copied the stream's L2 window into {windowed} of {kernels} kernel nodes"
    print(finding)
    warnings.warn(finding, UserWarning, stacklevel=1)
