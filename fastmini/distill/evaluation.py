"""Held-out evaluation: how close the student is to the teacher, and how well it fills masks.

Per matched layer: the mean student-teacher hidden-state cosine over real tokens and the
attention KL (the training loss's definition, averaged over the evaluation set); the
student's masked-LM accuracy and cross-entropy on masked tokens (and the teacher's accuracy
when it has an MLM head, for reference). Same batches and masks before and after training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.distill import losses
from fastmini.distill.distiller import Batch, StudentSide, teacher_forward
from fastmini.distill.models import Teacher


@torch.no_grad()
def evaluate(
    student_side: StudentSide,
    teacher: Teacher,
    layers: tuple[int, ...],
    batches: list[Batch],
    device: torch.device,
) -> dict[str, object]:
    if not batches:
        return {}
    was_training = student_side.training
    student_side.eval()
    try:
        cosine_sums = [0.0] * len(layers)
        attention_sums = [0.0] * len(layers)
        tokens = attention_elements = masked = correct = teacher_correct = 0
        cross_entropy_sum = 0.0
        for batch in batches:
            batch = batch.to(device)
            teacher_out = teacher_forward(teacher, batch, layers, True, True, teacher.head is not None)
            student_out = student_side(batch, need_hidden=True, need_attentions=True)
            real = batch.attention_mask.bool()
            heads, keys = student_out.attentions[0].shape[1], student_out.attentions[0].shape[-1]
            elements = int(real.sum()) * heads * keys
            for i, (s, t) in enumerate(zip(student_out.hidden, teacher_out.hidden, strict=True)):
                cosine_sums[i] += float(F.cosine_similarity(s.float(), t, dim=-1).sum())
            for i, (s, t) in enumerate(zip(student_out.attentions, teacher_out.attentions, strict=True)):
                attention_sums[i] += float(losses.attention_kl(s.float(), t, real)) * elements
            tokens += int(real.sum())
            attention_elements += elements
            labels = student_out.masked_labels
            masked += labels.numel()
            if labels.numel():
                logits = student_out.masked_logits.float()
                correct += int((logits.argmax(-1) == labels).sum())
                cross_entropy_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                if teacher_out.masked_logits is not None:
                    teacher_correct += int((teacher_out.masked_logits.argmax(-1) == labels).sum())
        cosines = [value / tokens for value in cosine_sums]
        attention = [value / attention_elements for value in attention_sums]
        metrics: dict[str, object] = {
            "hidden_cosine_per_layer": [round(value, 6) for value in cosines],
            "hidden_cosine_mean": round(sum(cosines) / len(cosines), 6),
            "attention_kl_per_layer": [round(value, 6) for value in attention],
            "attention_kl_sum": round(sum(attention), 6),
            "mlm_accuracy": round(correct / masked, 6) if masked else None,
            "mlm_cross_entropy": round(cross_entropy_sum / masked, 6) if masked else None,
            "masked_tokens": masked,
            "tokens": tokens,
            "windows": sum(int(b.input_ids.shape[0]) for b in batches),
        }
        if teacher.head is not None and masked:
            metrics["teacher_mlm_accuracy"] = round(teacher_correct / masked, 6)
        return metrics
    finally:
        student_side.train(was_training)
