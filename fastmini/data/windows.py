"""Documents -> fixed-length token windows, as the original recipe prepared Wikipedia.

Each document is tokenised with the teacher's tokenizer into overflowing windows of
``window_length`` tokens (special tokens included), consecutive windows sharing ``stride``
tokens (transformers' tokenizer ``stride``; the recipe uses 256 and 128). When a document
gives more than ``max_windows`` windows, ``max_windows`` of them are sampled without
replacement by a generator seeded with (seed, document index), so the result does not depend
on batching or worker count. Tokenisation runs through ``datasets.Dataset.map``: for a
dataset that lives in datasets' cache (a ``datasets`` name) the windows are cached too.
"""

from __future__ import annotations

import random

WINDOW_COLUMNS = ("input_ids", "special_tokens_mask")
# Part of every windowed dataset's cache fingerprint (datasets hashes WindowMaker's attributes, not its
# code): bump it whenever the windows a corpus gives change, so that no cache from before is reused.
WINDOWS_FORMAT_VERSION = 4  # 3: [UNK] is special too; 4: windows of special tokens only are dropped


class WindowMaker:
    """The batched ``map`` function (a class so that datasets can fingerprint it for its cache)."""

    def __init__(self, tokenizer, window_length: int, stride: int, max_windows: int | None, seed: int):
        self.tokenizer = tokenizer
        self.window_length = window_length
        self.stride = stride
        self.max_windows = max_windows
        self.seed = seed
        self.format_version = WINDOWS_FORMAT_VERSION

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        encoded = self.tokenizer(
            batch["text"],
            max_length=self.window_length,
            truncation=True,
            stride=self.stride,
            return_overflowing_tokens=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            # "[MASK]" or "[SEP]" written in a document is text: as special ids they could be masked and
            # learned as targets, and the special-tokens mask would not know them.
            split_special_tokens=True,
        )
        by_document: dict[int, list[int]] = {}
        for window, document in enumerate(encoded["overflow_to_sample_mapping"]):
            by_document.setdefault(document, []).append(window)
        # The mask marks only the [CLS]/[SEP] the tokenizer added; [UNK] (what unknown characters become) is special
        # as well for transformers' MLM collator, which the original recipe masked with: never selected.
        special_ids = set(self.tokenizer.all_special_ids)
        output: dict[str, list] = {name: [] for name in WINDOW_COLUMNS}
        for document, windows in by_document.items():
            kept = sample_windows(len(windows), self.max_windows, self.seed, indices[document])
            for position in kept:
                window = windows[position]
                ids = encoded["input_ids"][window]
                added = encoded["special_tokens_mask"][window]
                special = [int(flag or token in special_ids) for token, flag in zip(ids, added, strict=True)]
                if all(special):  # a document the tokenizer turned into nothing (zero-width or control characters)
                    continue
                output["input_ids"].append(ids)
                output["special_tokens_mask"].append(special)
        return output


def sample_windows(count: int, max_windows: int | None, seed: int, document_index: int) -> list[int]:
    """Positions (ascending) of the windows kept from a document that gave ``count`` windows."""
    if max_windows is None or count <= max_windows:
        return list(range(count))
    generator = random.Random(f"{seed}:{document_index}")
    return sorted(generator.sample(range(count), max_windows))


def check_window_stride(tokenizer, window_length: int, stride: int) -> None:
    """A ValueError unless consecutive windows can share ``stride`` tokens and still advance."""
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if not 0 <= stride < window_length - specials:
        raise ValueError(
            f"window stride ({stride}) must be smaller than the window length ({window_length}) minus the "
            f"{specials} special tokens the tokenizer adds"
        )


def make_windows(
    documents,
    tokenizer,
    window_length: int,
    stride: int,
    max_windows: int | None,
    seed: int,
    num_proc: int | None = None,
    description: str = "tokenising into windows",
):
    """A ``datasets.Dataset`` with ``input_ids`` and ``special_tokens_mask`` per window."""
    check_window_stride(tokenizer, window_length, stride)
    return documents.map(
        WindowMaker(tokenizer, window_length, stride, max_windows, seed),
        batched=True,
        with_indices=True,
        remove_columns=documents.column_names,
        num_proc=num_proc,
        desc=description,
    )
