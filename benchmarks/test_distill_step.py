"""One distillation step, fastmini's distiller vs the original recipe's step, on the CPU.

Pair: a MiniLM-L6-H384-sized BERT teacher *with* an MLM head (so all four losses run: V=30522,
H=384, A=12, I=1536, 6 layers; random weights) and the demo student (E=128, N=6, r=16, adapters).
Batch 8 x 128 of Wikipedia-like windows: six full windows and two shorter last-of-document ones
(100 and 60 tokens), 15% masked. One step = teacher forward + student forward/backward + all four
losses (no optimizer update), both in train mode with dropout 0.1, fp32.

Baseline ("original"): the original recipe's step (nlpie-research/MiniALBERT
general_distillation.py) rebuilt on transformers 5: fastmini.baselines.original's MiniALBERT
(transformers' ALBERT modules, eager attention, attention maps everywhere), the teacher's
full forward with eager attention and full-vocabulary logits, full-vocabulary student logits,
and the losses as SPEC.md writes them (masked_select of the counted rows, KLDivLoss "mean" /
CosineEmbeddingLoss / KLDivLoss "batchmean" / cross-entropy). fastmini: ``Distiller`` (teacher
under inference_mode, student unpadded, MLM heads and output KL on masked rows only, attention
KL without extra saved maps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmini import FastMiniConfig, FastMiniForMaskedLM
from fastmini.baselines.original import OriginalMiniAlbertForMaskedLM, original_config
from fastmini.distill.distiller import Batch, Distiller, StudentSide
from fastmini.distill.losses import LossWeights
from fastmini.distill.models import Teacher
from fastmini.flops import encoder_flops, masked_lm_head_flops

DEVICE = torch.device("cpu")
BATCH, SEQ = 8, 128
LENGTHS = [128] * 6 + [100, 60]
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
STUDENT = dict(num_recursions=6, embedding_size=128, use_adapter=True, reduction_factor=16)
LAYERS = (1, 2, 3, 4, 5, 6)  # teacher layers / recursions = 1


@pytest.fixture(scope="module")
def pair():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(**MINILM, attn_implementation="eager")).eval().requires_grad_(False)
    config = FastMiniConfig.from_teacher(teacher.config, **STUDENT)
    fields = {
        name: getattr(config, name)
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "hidden_act", "max_position_embeddings", "use_adapter", "reduction_factor")
    }  # fmt: skip
    original = OriginalMiniAlbertForMaskedLM(original_config(**fields)).train()
    return teacher, FastMiniForMaskedLM(config).train(), original


@pytest.fixture(scope="module")
def batch() -> Batch:
    generator = torch.Generator().manual_seed(0)
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    input_ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=generator) * mask
    special = torch.zeros_like(mask, dtype=torch.bool)
    special[:, 0] = True
    special[torch.arange(BATCH), torch.tensor(LENGTHS) - 1] = True
    selected = (torch.rand(BATCH, SEQ, generator=generator) < 0.15) & mask.bool() & ~special
    labels = input_ids.masked_fill(~selected, -100)
    return Batch(input_ids.masked_fill(selected, 103), mask, torch.zeros_like(input_ids), labels)


def original_losses(student, teacher, batch: Batch) -> torch.Tensor:
    """general_distillation.py's DistillationWrapper.forward, as SPEC.md writes the losses."""
    mask = batch.attention_mask
    logits, hidden_states, attentions = student(batch.input_ids, mask, batch.token_type_ids)
    with torch.no_grad():
        t = teacher(
            input_ids=batch.input_ids, attention_mask=mask, token_type_ids=batch.token_type_ids,
            output_hidden_states=True, output_attentions=True,
        )  # fmt: skip
    mlm = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch.labels.view(-1), ignore_index=-100)
    attention = hidden = 0.0
    for i, s_map in enumerate(attentions):
        t_map = t.attentions[LAYERS[i] - 1]
        select = mask.unsqueeze(1).repeat(1, s_map.shape[1], 1).unsqueeze(-1).expand_as(s_map).bool()
        s = torch.masked_select(s_map, select).view(-1, s_map.shape[-1]) + 1e-12
        tt = torch.masked_select(t_map, select).view(-1, s_map.shape[-1]) + 1e-12
        attention = attention + nn.KLDivLoss(reduction="mean")(torch.log(s), tt)
        s_hidden, t_hidden = hidden_states[1:][i], t.hidden_states[1:][LAYERS[i] - 1]
        select = mask.unsqueeze(-1).expand_as(s_hidden).bool()
        sh = torch.masked_select(s_hidden, select).view(-1, s_hidden.shape[-1])
        th = torch.masked_select(t_hidden, select).view(-1, s_hidden.shape[-1])
        hidden = hidden + nn.CosineEmbeddingLoss()(sh, th, sh.new_ones(sh.shape[0]))
    select = (batch.labels > -1).unsqueeze(-1).expand_as(logits).bool()
    s_logits = torch.masked_select(logits, select).view(-1, logits.shape[-1])
    t_logits = torch.masked_select(t.logits, select).view(-1, logits.shape[-1])
    output = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_logits, -1), F.softmax(t_logits, -1))
    return 1.0 * mlm + 3.0 * (attention + hidden) + 5.0 * output


def step_flops(student_config, teacher_config, masked: int) -> int:
    """Useful work of one step: teacher forward, student forward + backward (2x), masked-row heads."""
    teacher_encoder = encoder_flops(
        FastMiniConfig(**{**MINILM, "embedding_size": 384, "use_adapter": False}), LENGTHS
    )  # a BERT layer is the shared layer without adapters
    student = encoder_flops(student_config, LENGTHS) + masked_lm_head_flops(student_config, masked)
    return teacher_encoder + masked_lm_head_flops(student_config, masked) + 3 * student


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides:UserWarning")
def test_distillation_step(benchmark, compare, describe_device, pair, batch):
    teacher_model, student, original = pair
    teacher = Teacher(encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="bench")
    distiller = Distiller(StudentSide(student, None), teacher, LAYERS, LossWeights(), temperature=1.0)

    def fastmini_step():
        distiller(batch).total.backward()
        student.zero_grad(set_to_none=True)

    def original_step():
        original_losses(original, teacher_model, batch).backward()
        original.zero_grad(set_to_none=True)

    masked = int((batch.labels != -100).sum())
    benchmark.pedantic(fastmini_step, rounds=5, warmup_rounds=1)
    medians = compare(
        benchmark,
        group=f"distillation step {BATCH}x{SEQ}",
        contenders={"original": original_step, "fastmini": fastmini_step},
        baseline="original",
        flops=step_flops(student.config, teacher_model.config, masked),
        rounds=8,
        shape=f"batch={BATCH}x{SEQ} ({sum(LENGTHS)} real tokens, {masked} masked); teacher MiniLM-sized BERT "
        "with MLM head (H=384, 6 layers, V=30522); student E=128 H=384 N=6 r=16",
        dtype="float32",
        backend="fastmini: Distiller, torch ops; original: transformers modules, eager attention, full logits",
        device=describe_device(DEVICE),
    )
    benchmark.extra_info["speedup"] = round(medians["original"] / medians["fastmini"], 2)
