"""Encoder forward of the published MiniALBERT configuration on CUDA, bf16, against three targets.

- latency at (1, 128): target <= 0.25 ms and >= 10x lower than the original-style baseline;
- throughput at (128, 128): target >= 4 M useful tokens/s (reported also as % of the bf16 matmul
  rate measured in the same session);
- a ragged batch with ~50% padding: target >= 1.8x the same batch run padded (the latency of one batch, and
  the throughput of eight back to back with one synchronisation, a server's stream of batches).

Contenders (same weights, bf16, eval, inference mode):
- "original": the original MiniALBERT forward (transformers' ALBERT modules, eager attention,
  attention maps always computed), the baseline of the first two groups;
- "fastmini": the default path (unpadded when the batch has padding; ops by dispatch);
- "fastmini-graphed": ``model.graphed_encoder()``, one CUDA graph per shape bucket (padded layout);
- "fastmini-graphed-triton": the same captured with ``FASTMINI_BACKEND=triton`` (the fused kernels);
- "fastmini-graphed-three-qkv": graphed with query, key and value as three GEMMs
  (``SharedLayer.fuse_qkv = False``): what the one concatenated GEMM gains;
- "fastmini-graphed-l2" (throughput group only since it measured no gain at either size on an H200,
  2026-11-26): graphed, the shared layer's weights in one buffer under a persisting L2 access-policy window
  (fastmini.runtime.persist_in_l2);
- "torch-compile" (a latency group of its own, the file's last test: its compile is a minute of device
  time): what users would try instead of graphed_encoder(), ``torch.compile(model.set_unpadding(False),
  mode="reduce-overhead", fullgraph=True)`` (inductor's kernels replayed through CUDA graphs);
- ragged group: "fastmini-padded" (``encode(unpad=False)``: the same batch run padded, the
  baseline), "fastmini" (unpadded; CUDA picks torch's varlen flash attention by itself),
  "fastmini-graphed" (the padded layout replayed) and "fastmini-graphed-unpadded"
  (``graphed_encoder(unpadded=True)``: the real tokens replayed, one graph per token bucket; it reads the
  mask on the host, a sync every call), "fastmini-graphed-unpadded-host" (the same encoder handed the
  batch on the CPU, as a tokenizer gives it: no sync, one copy in, the next batch prepared during a replay),
  "fastmini-graphed-unpadded-host-8-steps" (that one with 8 token buckets a doubling, the default until
  session 20, instead of 16: more filler, fewer graphs), "fastmini-graphed-unpadded-cudnn" (recorded with
  cuDNN's varlen attention kernel instead of flash-attention 2's: fastmini.ops.attention.VARLEN_KERNEL =
  "cudnn", an experiment, timed last; its capture failed on the H200 in session 20),
  "fastmini-graphed-unpadded-host-fused-norms" (LayerNorms folded into the adapters) and
  "...-all-experiments" (that and cuDNN's);
- latency experiments, graphed with a switch on (off by default until measured): "fastmini-graphed-rows-adapter"
  and "fastmini-graphed-fused-norms" (the switches below); "fastmini-graphed-bool-mask" is the former default
  (fastmini.ops.attention.SDPA_MASK = "bool": SDPA converts the bool key padding mask in every recursion
  instead of taking its additive form made once a forward), kept as the comparison.

Contenders that fail to build are reported in the benchmark's info (``unavailable``) instead of failing
the others (every H200 run so far built them all).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable

import pytest
import torch

from fastmini import FastMiniModel
from fastmini.baselines.original import (
    PUBLISHED_MINIALBERT_128,
    PUBLISHED_MINIALBERT_128_SHAPE,
    random_published_checkpoint,
)
from fastmini.flops import encoder_flops
from fastmini.ops import BACKEND_ENV_VAR
from fastmini.ops import attention as attention_ops
from fastmini.ops.adapter_bottleneck import TRITON_MAX_FEW_ROWS_ON_GPU
from fastmini.ops.dispatch import in_cuda_graph_recording
from fastmini.runtime.buckets import DEFAULT_BATCH_BUCKETS, DEFAULT_SEQUENCE_BUCKETS, BucketGrid, token_bucket

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU targets: timed on CUDA only")

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
SHAPE = f"{PUBLISHED_MINIALBERT_128_SHAPE}, bf16"


@contextlib.contextmanager
def fastmini_backend(name: str | None):
    previous = os.environ.get(BACKEND_ENV_VAR)
    if name is not None:
        os.environ[BACKEND_ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV_VAR, None)
        else:
            os.environ[BACKEND_ENV_VAR] = previous


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    original, directory = random_published_checkpoint(tmp_path_factory.mktemp("published"))

    def fastmini_copy() -> FastMiniModel:
        return FastMiniModel.from_pretrained(directory).to(DEVICE, DTYPE).eval()

    return {"original": original.to(DEVICE, DTYPE), "fastmini_copy": fastmini_copy}


def _inference(fn: Callable, calls: int = 1) -> Callable:
    """``fn`` called ``calls`` times back to back in inference mode, then one synchronisation: with 1, a batch's
    latency; with more, a stream of batches, where the host may prepare one while the GPU runs the last."""

    def call():
        with torch.inference_mode():
            for _ in range(calls):
                result = fn()
        torch.cuda.synchronize(DEVICE)
        return result

    return call


def _graphed(
    model: FastMiniModel,
    backend: str | None = None,
    l2_resources: contextlib.ExitStack | None = None,
    unpadded: bool = False,
    switch: Callable[[], contextlib.AbstractContextManager] | None = None,
    token_steps: int | None = None,
) -> Callable:
    """fn(input_ids, mask) through CUDA graphs; captures happen inside the backend context (and inside
    ``switch()``, e.g. a module constant patched for an experiment, which the graphs then record).
    ``token_steps``: the unpadded encoder's token buckets per doubling (None: its default).

    With ``l2_resources``, the shared layer's weights go under a persisting L2 window that the graphs'
    kernel nodes carry (graph_hook); the window, a device-wide reservation, is handed to that stack so
    that it is removed when the contender is dropped or its group ends, not left to later groups and files.
    """
    from fastmini.runtime import CudaGraphCapture, pack_parameters, persist_in_l2

    options = {}
    if l2_resources is not None:
        packed = pack_parameters(model.encoder.shared_layer)
        # No stream: the graphs' kernel nodes get the window by the hook; a stream window would be unused.
        window = l2_resources.enter_context(persist_in_l2(packed.buffer))
        options["capture"] = CudaGraphCapture(graph_hook=window.apply_to_graph)
    if token_steps is not None:
        options["token_steps_per_doubling"] = token_steps
    encoder = model.graphed_encoder(unpadded=unpadded, **options)

    def run(input_ids, mask):
        with fastmini_backend(backend), switch() if switch is not None else contextlib.nullcontext():
            return encoder(input_ids, mask)

    return run


class Settings:
    """Module attributes set for the duration of a call and restored after it: ``Settings((module, name, value),
    ...)``. The graphed contenders enter their switch on every timed call (a call that captures a new bucket must
    record the setting), so it must cost next to nothing: unittest.mock.patch took ~5 us an attribute (16 us for
    the three latency switches against a ~570 us forward), a visible share of the gains being measured."""

    def __init__(self, *settings: tuple[object, str, object]):
        self.settings = settings
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> Settings:
        self._saved = [(owner, name, getattr(owner, name)) for owner, name, _ in self.settings]
        for owner, name, value in self.settings:
            setattr(owner, name, value)
        return self

    def __exit__(self, *exc_info) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)


# The experiments' switches, off by default until a GPU run shows them right and faster. Each a (module, name,
# value) setting; modules are looked up as objects (a dotted path to an op module would find the op function of
# that name that fastmini.ops exports).
CUDNN_VARLEN = (attention_ops, "VARLEN_KERNEL", "cudnn")  # packed attention through cuDNN's kernel
BOOL_SDPA_MASK = (attention_ops, "SDPA_MASK", "bool")  # the former default: SDPA converts the mask every call
# the adapter's CUDA-core forward (kernels/adapter_bottleneck_rows.py) wherever the op takes the few-rows kernel
ROWS_ADAPTER_KERNEL = (importlib.import_module("fastmini.kernels.adapter_bottleneck"), "ROWS_KERNEL_UP_TO",
                       TRITON_MAX_FEW_ROWS_ON_GPU)  # fmt: skip
_FUSED_NORM_OP = importlib.import_module("fastmini.ops.add_layer_norm_adapter")
# The encoder's LayerNorms folded into the adapters after them: the fused kernel taken as verified on a GPU, and
# chosen at every row count while a graph records (the adapter kernel's own row rule, which the op follows,
# would leave the ragged batch's ~4.5K tokens to the two ops: what the experiment measures is the fusion).
FUSED_NORM_ADAPTERS = (
    (_FUSED_NORM_OP, "_VERIFIED_ON_GPU", ("triton",)),
    (_FUSED_NORM_OP, "_adapter_kernel_pays_off_on_gpu", lambda x: in_cuda_graph_recording()),
)


def fused_norm_adapters() -> Settings:
    return Settings(*FUSED_NORM_ADAPTERS)


def all_latency_experiments() -> Settings:
    """Every latency switch above at once: what they buy together."""
    return Settings(ROWS_ADAPTER_KERNEL, *FUSED_NORM_ADAPTERS)


def all_ragged_experiments() -> Settings:
    """cuDNN's varlen kernel and the fused LayerNorm-adapters at once."""
    return Settings(CUDNN_VARLEN, *FUSED_NORM_ADAPTERS)


def _three_qkv(model: FastMiniModel) -> FastMiniModel:
    model.encoder.shared_layer.fuse_qkv = False
    return model


def contenders_for(
    models, input_ids, mask, names, resources: contextlib.ExitStack, calls: int = 1
) -> tuple[dict[str, Callable], dict[str, str]]:
    """The named contenders as zero-argument callables (each runs the batch ``calls`` times, see _inference);
    those that fail to build are listed apart. What a built contender holds on the device beyond memory (the L2
    window) goes into ``resources``."""
    fresh = models["fastmini_copy"]

    def bound(fn: Callable) -> Callable:
        return lambda: fn(input_ids, mask)

    host_ids, host_mask = input_ids.cpu(), mask.cpu()  # as a tokenizer hands them over

    def bound_to_host_inputs(fn: Callable) -> Callable:
        return lambda: fn(host_ids, host_mask)

    builders = {
        "original": lambda _: bound(models["original"]),
        "fastmini": lambda _: bound(fresh()),
        "fastmini-padded": lambda _: bound(functools.partial(fresh().encode, unpad=False)),
        "fastmini-graphed": lambda _: bound(_graphed(fresh())),
        "fastmini-graphed-triton": lambda _: bound(_graphed(fresh(), backend="triton")),
        "fastmini-graphed-l2": lambda own: bound(_graphed(fresh(), l2_resources=own)),
        "fastmini-graphed-unpadded": lambda _: bound(_graphed(fresh(), unpadded=True)),
        "fastmini-graphed-unpadded-host": lambda _: bound_to_host_inputs(_graphed(fresh(), unpadded=True)),
        "fastmini-graphed-unpadded-host-8-steps": lambda _: bound_to_host_inputs(
            _graphed(fresh(), unpadded=True, token_steps=8)
        ),
        "fastmini-graphed-unpadded-cudnn": lambda _: bound_to_host_inputs(
            _graphed(fresh(), unpadded=True, switch=lambda: Settings(CUDNN_VARLEN))
        ),
        "fastmini-graphed-bool-mask": lambda _: bound(_graphed(fresh(), switch=lambda: Settings(BOOL_SDPA_MASK))),
        "fastmini-graphed-rows-adapter": lambda _: bound(
            _graphed(fresh(), switch=lambda: Settings(ROWS_ADAPTER_KERNEL))
        ),
        "fastmini-graphed-fused-norms": lambda _: bound(_graphed(fresh(), switch=fused_norm_adapters)),
        "fastmini-graphed-all-experiments": lambda _: bound(_graphed(fresh(), switch=all_latency_experiments)),
        "fastmini-graphed-unpadded-host-fused-norms": lambda _: bound_to_host_inputs(
            _graphed(fresh(), unpadded=True, switch=fused_norm_adapters)
        ),
        "fastmini-graphed-unpadded-host-all-experiments": lambda _: bound_to_host_inputs(
            _graphed(fresh(), unpadded=True, switch=all_ragged_experiments)
        ),
        "fastmini-graphed-three-qkv": lambda _: bound(_graphed(_three_qkv(fresh()))),
        "torch-compile": lambda _: bound(
            torch.compile(fresh().set_unpadding(False), mode="reduce-overhead", fullgraph=True)
        ),
    }
    built, unavailable = {}, {}
    for name in names:
        with contextlib.ExitStack() as own:  # a contender that fails to build gives its resources back here
            try:
                candidate = _inference(builders[name](own), calls)
                candidate()  # first call: captures graphs, compiles kernels
            except Exception as error:  # noqa: BLE001 - reported in the results, the others still run
                unavailable[name] = f"{type(error).__name__}: {str(error)[:300]}"
                continue
            built[name] = candidate
            resources.enter_context(own.pop_all())
    return built, unavailable


def _run_group(
    benchmark,
    compare,
    describe_device,
    models,
    group,
    input_ids,
    mask,
    names,
    baseline,
    rounds,
    profiler=None,
    profiled=("fastmini",),
    calls=1,
):
    """Times the named contenders interleaved; with ``profiler`` (the record_kernel_profile fixture) also profiles
    the ``profiled`` ones once: a contender's kernel time against its median says how much of it the host
    adds (launches for the eager model; for a graphed one, the work around its replay)."""
    # The L2 window stays for the group's interleaved timing (re-reserving it around every call of
    # its contender would time driver calls too) and is removed when the group ends, passed or failed.
    with contextlib.ExitStack() as resources:
        contenders, unavailable = contenders_for(models, input_ids, mask, names, resources, calls)
        if baseline not in contenders:
            pytest.fail(f"baseline {baseline} unavailable: {unavailable.get(baseline)}")
        lengths = mask.sum(1).tolist()
        timed = "fastmini-graphed" if "fastmini-graphed" in contenders else baseline
        benchmark.pedantic(contenders[timed], rounds=rounds, warmup_rounds=3)
        medians = compare(
            benchmark,
            group=group,
            contenders=contenders,
            baseline=baseline,
            flops=calls * _flops(lengths),
            useful_tokens=calls * sum(lengths),
            rounds=rounds,
            shape=f"batch={mask.shape[0]} seq={mask.shape[1]} real tokens={sum(lengths)}, {SHAPE}",
            batches_per_timed_call=calls,
            dtype="bfloat16",
            backend="original: transformers' ALBERT modules, eager attention; fastmini*: the contender's name says "
            "the path (automatic op backend unless it names triton)",
            pedantic_contender=timed,
            device=describe_device(DEVICE),
        )
        for name in profiled if profiler is not None else ():
            if name in contenders:
                profiler(benchmark, name, contenders[name])
    benchmark.extra_info["unavailable"] = unavailable
    return medians


def _flops(lengths) -> int:
    from fastmini import FastMiniConfig

    return encoder_flops(FastMiniConfig(**PUBLISHED_MINIALBERT_128), lengths)


def _full_batch(batch: int, seq: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, PUBLISHED_MINIALBERT_128["vocab_size"], (batch, seq), generator=generator)
    return input_ids.to(DEVICE), torch.ones(batch, seq, dtype=torch.long, device=DEVICE)


def _ragged_batch():
    """64 sequences with lengths uniform in 1..128 (a fixed draw, ~50% padding), padded to 128."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 129, (64,), generator=generator)
    mask = (torch.arange(128)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(1, PUBLISHED_MINIALBERT_128["vocab_size"], (64, 128), generator=generator) * mask
    return input_ids.to(DEVICE), mask.to(DEVICE)


GRAPHED = ["fastmini-graphed", "fastmini-graphed-triton", "fastmini-graphed-three-qkv"]
LATENCY_EXPERIMENTS = [
    "fastmini-graphed-bool-mask",
    "fastmini-graphed-rows-adapter",
    "fastmini-graphed-fused-norms",
    "fastmini-graphed-all-experiments",
]


def test_latency_1x128(benchmark, compare, describe_device, record_kernel_profile, models):
    input_ids, mask = _full_batch(1, 128)
    medians = _run_group(
        benchmark, compare, describe_device, models, "gpu encoder latency 1x128", input_ids, mask,
        ["original", "fastmini", *GRAPHED, *LATENCY_EXPERIMENTS], "original", rounds=200,
        profiler=record_kernel_profile, profiled=("fastmini", "fastmini-graphed", *LATENCY_EXPERIMENTS),
    )  # fmt: skip
    benchmark.extra_info["target"] = "<= 0.25 ms and >= 10x lower than original"
    benchmark.extra_info["best_ms"] = round(min(medians.values()) * 1e3, 4)


def test_throughput_128x128(benchmark, compare, describe_device, record_matmul_fraction, models):
    input_ids, mask = _full_batch(128, 128)
    medians = _run_group(
        benchmark, compare, describe_device, models, "gpu encoder throughput 128x128", input_ids, mask,
        ["original", "fastmini", *GRAPHED, "fastmini-graphed-l2"], "original", rounds=30,
    )  # fmt: skip
    benchmark.extra_info["target"] = ">= 4 M useful tokens/s"
    flops = _flops([128] * 128)
    record_matmul_fraction(benchmark, "gpu encoder throughput 128x128", medians, flops, DEVICE, DTYPE, (8192,) * 3)


def test_ragged_half_padding(benchmark, compare, describe_device, record_kernel_profile, models):
    """The ragged batch (_ragged_batch), ~50% padding: latency of one batch."""
    input_ids, mask = _ragged_batch()
    _run_group(
        benchmark, compare, describe_device, models, "gpu encoder ragged 64x128", input_ids, mask,
        # Not cuDNN's varlen kernel ("fastmini-graphed-unpadded-cudnn", "...-all-experiments"): recording it into
        # a graph failed on the H200 (session 20: cudaErrorStreamCaptureInvalidated); its builders stay.
        ["fastmini-padded", "fastmini", "fastmini-graphed", "fastmini-graphed-unpadded",
         "fastmini-graphed-unpadded-host", "fastmini-graphed-unpadded-host-8-steps",
         "fastmini-graphed-unpadded-host-fused-norms", "original"],
        "fastmini-padded", rounds=30, profiler=record_kernel_profile,
        profiled=("fastmini", "fastmini-graphed", "fastmini-graphed-unpadded-host"),
    )  # fmt: skip
    benchmark.extra_info["padding_percent"] = round(100 * (1 - float(mask.float().mean())), 1)
    # The tokens the unpadded graphs compute: the real ones rounded up to their token bucket.
    grid = BucketGrid.make(DEFAULT_BATCH_BUCKETS, DEFAULT_SEQUENCE_BUCKETS, None).choose(*input_ids.shape)
    real, limit = int(mask.sum()), grid[0] * grid[1]
    benchmark.extra_info["unpadded_token_bucket"] = token_bucket(real, limit)[0]
    benchmark.extra_info["unpadded_token_bucket_8_steps"] = token_bucket(real, limit, 8)[0]
    benchmark.extra_info["target"] = "unpadded >= 1.8x fastmini-padded (and graphed-unpadded against graphed)"


def test_ragged_stream_of_batches(benchmark, compare, describe_device, models):
    """The ragged batch of test_ragged_half_padding eight times back to back, one synchronisation at the end (a
    server's stream of batches): throughput rather than latency, where the unpadded graphs handed host inputs
    need not wait for the GPU between batches."""
    input_ids, mask = _ragged_batch()
    _run_group(
        benchmark, compare, describe_device, models, "gpu encoder ragged 64x128, 8 batches back to back",
        input_ids, mask, ["fastmini-graphed", "fastmini-graphed-unpadded", "fastmini-graphed-unpadded-host",
                          "fastmini-graphed-unpadded-host-8-steps", "fastmini-graphed-unpadded-host-fused-norms"],
        "fastmini-graphed", rounds=10, calls=8,
    )  # fmt: skip
    benchmark.extra_info["target"] = "unpadded >= 1.8x the same batches padded (here: the padded graph)"


def test_latency_1x128_against_torch_compile(benchmark, compare, describe_device, models):
    """Last in the file: its compile takes about a minute of device time, and a budget that ends during it
    must cost only this comparison, not the targets' groups above."""
    input_ids, mask = _full_batch(1, 128)
    _run_group(
        benchmark, compare, describe_device, models, "gpu encoder latency 1x128 vs torch.compile", input_ids, mask,
        ["original", "fastmini-graphed", "torch-compile"], "original", rounds=200,
    )  # fmt: skip
