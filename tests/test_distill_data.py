"""Data for distillation: corpus readers, windows, dynamic masking, batches."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fastmini.data.corpus import DEFAULT_DATA, DataError, load_documents, read_file
from fastmini.data.masking import IGNORE_INDEX, MASK_FRACTION, MASK_PROBABILITY, RANDOM_FRACTION
from fastmini.data.wikipedia import plain_text
from fastmini.data.windows import make_windows, sample_windows
from fastmini.distill.batches import MaskedWindows
from fastmini.distill.config import DistillConfig, validate
from fastmini.distill.testing import tiny_vocabulary
from fastmini.training.batching import derived_seed
from fastmini.training.errors import UsageError


@pytest.fixture
def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab=tiny_vocabulary())


def as_dataset(texts):
    import datasets

    return datasets.Dataset.from_dict({"text": texts})


def words(start: int, count: int) -> str:
    return " ".join(f"w{i % 94}" for i in range(start, start + count))


# ---- windows --------------------------------------------------------------------------------------


def test_windows_are_the_tokenizers_overflowing_windows(tokenizer):
    """Length, CLS/SEP framing and overlap as transformers' stride defines them (SPEC: 256/128)."""
    text = words(0, 50)
    windows = make_windows(as_dataset([text]), tokenizer, window_length=16, stride=6, max_windows=None, seed=0)
    expected = tokenizer(text, max_length=16, truncation=True, stride=6, return_overflowing_tokens=True)
    assert windows["input_ids"] == expected["input_ids"]
    ids = windows["input_ids"]
    assert len(ids) > 3 and all(len(w) <= 16 for w in ids) and len(ids[0]) == 16
    assert all(w[0] == tokenizer.cls_token_id and w[-1] == tokenizer.sep_token_id for w in ids)
    for first, second in zip(ids, ids[1:], strict=False):
        assert first[1:-1][-6:] == second[1:7]  # consecutive windows share `stride` tokens
    assert windows["special_tokens_mask"][0] == [1] + [0] * 14 + [1]


def test_documents_the_tokenizer_turns_into_nothing_give_no_window(tokenizer):
    """Zero-width or control characters survive str.strip() and tokenise to nothing: a [CLS][SEP] window
    trained on special tokens only."""
    windows = make_windows(as_dataset(["\u200b\u200b", words(0, 5), "\x00\x01"]), tokenizer, 16, 4, None, seed=0)
    assert windows["input_ids"] == [tokenizer(words(0, 5))["input_ids"]]


def test_at_most_k_windows_per_document_sampled_with_the_seed(tokenizer):
    documents = as_dataset([words(0, 200), words(7, 12), words(3, 200)])
    kwargs = dict(window_length=16, stride=4, max_windows=3)
    windows = make_windows(documents, tokenizer, seed=0, **kwargs)
    everything = make_windows(documents, tokenizer, seed=0, window_length=16, stride=4, max_windows=None)
    assert len(windows) == 3 + 1 + 3 and len(everything) > 20
    assert all(w in everything["input_ids"] for w in windows["input_ids"])
    again = make_windows(documents, tokenizer, seed=0, **kwargs)
    other_seed = make_windows(documents, tokenizer, seed=1, **kwargs)
    assert again["input_ids"] == windows["input_ids"]
    assert other_seed["input_ids"] != windows["input_ids"]


def test_window_sampling_does_not_depend_on_how_documents_are_batched(tokenizer):
    documents = as_dataset([words(i, 150) for i in range(5)])
    one = documents.map(lambda b: b, batched=True)  # a copy, to map twice without datasets' cache
    windows = make_windows(documents, tokenizer, 16, 4, 2, seed=3)
    from fastmini.data.windows import WindowMaker

    per_document = one.map(
        WindowMaker(tokenizer, 16, 4, 2, 3), batched=True, batch_size=1, with_indices=True, remove_columns=["text"]
    )
    assert per_document["input_ids"] == windows["input_ids"]


def test_sample_windows_keeps_order_and_bounds():
    assert sample_windows(5, 10, 0, 0) == [0, 1, 2, 3, 4]
    kept = sample_windows(50, 10, 0, 3)
    assert len(kept) == 10 and kept == sorted(set(kept)) and max(kept) < 50
    assert kept != sample_windows(50, 10, 0, 4)


def test_stride_must_leave_room_for_new_tokens(tokenizer):
    with pytest.raises(ValueError, match="stride"):
        make_windows(as_dataset(["w1 w2"]), tokenizer, window_length=8, stride=6, max_windows=None, seed=0)


def test_tokenised_windows_are_cached_by_datasets(tokenizer, tmp_path):
    """A dataset that lives in datasets' cache gets its windows cached under a stable fingerprint."""
    import datasets

    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": words(i, 60)}) for i in range(4)))
    cached = datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(tmp_path / "cache"))
    first = make_windows(cached, tokenizer, 16, 4, 3, seed=0)
    second = make_windows(cached, tokenizer, 16, 4, 3, seed=0)
    other = make_windows(cached, tokenizer, 16, 4, 3, seed=1)
    assert first.cache_files and first.cache_files == second.cache_files
    assert other.cache_files != first.cache_files


def test_a_new_windows_format_is_not_served_from_an_old_cache(tokenizer, tmp_path, monkeypatch):
    import datasets

    import fastmini.data.windows as windows_module

    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": words(i, 60)}) for i in range(4)))
    cached = datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(tmp_path / "cache"))
    before = make_windows(cached, tokenizer, 16, 4, 3, seed=0)
    monkeypatch.setattr(windows_module, "WINDOWS_FORMAT_VERSION", windows_module.WINDOWS_FORMAT_VERSION + 1)
    after = make_windows(cached, tokenizer, 16, 4, 3, seed=0)
    assert after.cache_files != before.cache_files


@pytest.fixture(params=[False, True], ids=["slow", "fast"])
def both_tokenizers(request, tmp_path):
    """The tiny vocabulary's BERT tokenizer, Python (slow) and Rust (fast): both must give the same windows."""
    from transformers import BertTokenizer, BertTokenizerFast

    tokenizer = BertTokenizer(vocab=tiny_vocabulary())
    if not request.param:
        return tokenizer
    tokenizer.save_pretrained(tmp_path)
    return BertTokenizerFast.from_pretrained(tmp_path)


def test_unknown_tokens_are_special_never_masked(both_tokenizers):
    """As transformers' MLM collator (the original recipe's): [UNK] is never selected nor a target."""
    tokenizer = both_tokenizers
    windows = make_windows(as_dataset(["w1 unknownword w2 zzz w3"]), tokenizer, 32, 4, None, seed=0)
    input_ids, special = windows["input_ids"][0], windows["special_tokens_mask"][0]
    assert input_ids.count(tokenizer.unk_token_id) == 2
    expected = tokenizer.get_special_tokens_mask(input_ids, already_has_special_tokens=True)
    assert special == expected == [1, 0, 1, 0, 1, 0, 1]


def test_special_token_strings_in_a_document_are_text_not_special_ids(both_tokenizers):
    tokenizer = both_tokenizers
    windows = make_windows(as_dataset(["w1 [MASK] w2 [SEP] [PAD] [CLS] w3"]), tokenizer, 32, 4, None, seed=0)
    input_ids, special = windows["input_ids"][0], windows["special_tokens_mask"][0]
    specials = {tokenizer.mask_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id}
    inner = input_ids[1:-1]  # [UNK] for the brackets of this vocabulary is fine: unknown text
    assert input_ids[0] == tokenizer.cls_token_id and input_ids[-1] == tokenizer.sep_token_id
    assert special == [1] + [int(token == tokenizer.unk_token_id) for token in inner] + [1]
    assert not specials & set(inner), "a literal special-token string became a special id"


# ---- masking: through the distiller's own path, MaskedWindows.batch ------------------------------


def masked_windows(tokenizer, probability: float = MASK_PROBABILITY, rows: int = 400, length: int = 64):
    """(MaskedWindows over ``rows`` windows [CLS] words [SEP], every other one half as long so that a batch of
    them pads it, the batch's unmasked ids padded with [PAD], where those are special: [CLS], [SEP], padding)."""
    import datasets

    generator = torch.Generator().manual_seed(0)
    lengths = [length // 2 if row % 2 else length for row in range(rows)]
    input_ids = torch.full((rows, length), tokenizer.pad_token_id)
    special = torch.ones(rows, length, dtype=torch.bool)
    for row, size in enumerate(lengths):
        input_ids[row, 1 : size - 1] = torch.randint(5, len(tokenizer), (size - 2,), generator=generator)
        input_ids[row, 0], input_ids[row, size - 1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        special[row, 1 : size - 1] = False
    windows = datasets.Dataset.from_dict(
        {
            "input_ids": [ids[:size].tolist() for ids, size in zip(input_ids, lengths, strict=True)],
            "special_tokens_mask": [flags[:size].int().tolist() for flags, size in zip(special, lengths, strict=True)],
        }
    )
    masked = MaskedWindows(windows, tokenizer, len(tokenizer), probability, MASK_FRACTION, RANDOM_FRACTION)
    return masked, input_ids, special


def masked_batch(windows: MaskedWindows, seed: int = 1):
    """Every window in one batch, each masked with its own seed as the distiller derives them."""
    indices = list(range(len(windows)))
    return windows.batch(indices, [derived_seed(seed, index) for index in indices])


def test_masking_statistics_are_15_percent_and_80_10_10(tokenizer):
    windows, input_ids, special = masked_windows(tokenizer)
    batch = masked_batch(windows)
    corrupted, labels = batch.input_ids, batch.labels
    selected = labels != IGNORE_INDEX
    share = selected.sum() / (~special).sum()
    assert abs(share.item() - 0.15) < 0.01  # ~18,000 eligible tokens: 3 sigma is ~0.008
    masked = (corrupted == tokenizer.mask_token_id) & selected
    unchanged = (corrupted == input_ids) & selected
    randomised = selected & ~masked & ~unchanged
    count = selected.sum().item()
    assert abs(masked.sum().item() / count - 0.8) < 0.03
    assert abs(unchanged.sum().item() / count - 0.1) < 0.03 + 1 / len(tokenizer)  # a random id may equal the original
    assert abs(randomised.sum().item() / count - 0.1) < 0.03
    assert torch.equal(labels[selected], input_ids[selected])
    assert torch.equal(corrupted[~selected], input_ids[~selected])


def test_special_tokens_and_padding_are_never_masked_or_changed(tokenizer):
    windows, input_ids, special = masked_windows(tokenizer, probability=1.0)
    for seed in range(5):
        batch = masked_batch(windows, seed)
        assert (batch.labels[special] == IGNORE_INDEX).all()
        assert torch.equal(batch.input_ids[special], input_ids[special])  # [CLS], [SEP] and [PAD] as they were
        assert (batch.labels[~special] != IGNORE_INDEX).all()  # probability 1: every other token is selected
    assert torch.equal(batch.attention_mask.bool(), input_ids != tokenizer.pad_token_id)
    assert not batch.token_type_ids.any()


def test_masks_are_a_function_of_each_windows_seed_alone(tokenizer):
    """Same seeds, same masks; another seed, other masks; and a window masks the same alone as in a batch
    (padded or not: resumed and multi-process runs regroup windows)."""
    windows, _, _ = masked_windows(tokenizer, rows=8)
    first, again, other = masked_batch(windows, 5), masked_batch(windows, 5), masked_batch(windows, 6)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.labels, other.labels)
    for row in (0, 3):
        alone = windows.batch([row], [derived_seed(5, row)])
        size = alone.input_ids.shape[1]
        assert torch.equal(alone.input_ids[0], first.input_ids[row, :size])
        assert torch.equal(alone.labels[0], first.labels[row, :size])


@pytest.mark.parametrize(
    ("rates", "message", "option_message"),
    [
        (
            (float("nan"), 0.8, 0.1),
            r"^mask_probability must be in \[0, 1\], got nan$",
            r"^--mask-probability must be in \[0, 1\], got nan$",
        ),
        ((0.15, 1.5, 0.0), r"^mask_fraction must be in \[0, 1\], got 1.5$", r"^--mask-fraction must be in \[0, 1\]"),
        ((0.15, 0.8, -0.1), r"^random_fraction must be in \[0, 1\]", r"^--random-fraction must be in \[0, 1\]"),
        (
            (0.15, 0.9, 0.2),
            r"^mask_fraction \(0.9\) \+ random_fraction \(0.2\) must be <= 1$",
            r"^--mask-fraction \(0.9\) \+ --random-fraction \(0.2\) must be <= 1$",
        ),
    ],
    ids=["nan-probability", "fraction-above-1", "negative-fraction", "fractions-above-1-together"],
)
def test_nonsense_masking_rates_are_refused_by_one_rule_named_by_parameter_or_option(
    tokenizer, rates, message, option_message
):
    """MaskedWindows and the distiller's options check the rates by the same rule (check_masking); the options
    say it with their flags."""
    windows, _, _ = masked_windows(tokenizer, rows=2)
    with pytest.raises(ValueError, match=message):
        MaskedWindows(windows.windows, tokenizer, len(tokenizer), *rates)
    names = ("mask_probability", "mask_fraction", "random_fraction")
    with pytest.raises(UsageError, match=option_message):
        validate(dataclasses.replace(DistillConfig(), **dict(zip(names, rates, strict=True))))


def test_the_distiller_needs_some_masked_tokens():
    with pytest.raises(UsageError, match="--mask-probability must be > 0"):
        validate(dataclasses.replace(DistillConfig(), mask_probability=0.0))
    validate(DistillConfig())  # the defaults pass


# ---- corpus readers -------------------------------------------------------------------------------


def test_text_files_by_line_paragraph_and_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one line\nsecond line\n\n  \nthird after blank\n")
    assert read_file(path, text_unit="line") == ["one line", "second line", "third after blank"]
    assert read_file(path, text_unit="paragraph") == ["one line\nsecond line", "third after blank"]
    assert read_file(path, text_unit="file") == ["one line\nsecond line\n\n  \nthird after blank"]
    path.write_text("first\n\u00a0\nsecond\n\x0c\nthird\n\u3000\t\nfourth\n")  # blank lines of other whitespace
    assert read_file(path, text_unit="paragraph") == ["first", "second", "third", "fourth"]


def test_a_pattern_through_a_symlinked_folder_loop_reads_each_file_once(tmp_path):
    from fastmini.data.corpus import local_files

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("a\n")
    (tmp_path / "corpus" / "loop").symlink_to(tmp_path / "corpus")
    assert local_files(str(tmp_path / "corpus" / "**" / "*.txt")) == [tmp_path / "corpus" / "a.txt"]


def test_json_lines_json_array_csv_tsv_and_parquet(tmp_path):
    import pyarrow
    import pyarrow.parquet as parquet

    (tmp_path / "a.jsonl").write_text('{"text": "first doc", "id": 1}\n\n{"text": "second doc"}\n{"text": ""}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"text": "array doc"}, {"text": None}]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f.json").write_text(json.dumps([{"body": "own field"}]))
    (tmp_path / "c.csv").write_text('id,text\n1,"csv, with comma"\n2,"multi\nline"\n')
    (tmp_path / "d.tsv").write_text("text\tlabel\ntab doc\t0\n")
    parquet.write_table(pyarrow.table({"text": ["parquet doc", None, "another"]}), tmp_path / "e.parquet")
    assert read_file(tmp_path / "a.jsonl") == ["first doc", "second doc"]
    assert read_file(tmp_path / "b.json") == ["array doc"]
    assert read_file(tmp_path / "other" / "f.json", text_field="body") == ["own field"]
    assert read_file(tmp_path / "c.csv") == ["csv, with comma", "multi\nline"]
    assert read_file(tmp_path / "d.tsv") == ["tab doc"]
    assert read_file(tmp_path / "e.parquet") == ["parquet doc", "another"]
    (tmp_path / "other" / "f.json").unlink()
    everything = load_documents(str(tmp_path))  # a directory: every supported file, sorted by path
    assert everything["text"] == [
        "first doc",
        "second doc",
        "array doc",
        "csv, with comma",
        "multi\nline",
        "tab doc",
        "parquet doc",
        "another",
    ]
    assert load_documents(str(tmp_path / "*.jsonl"))["text"] == ["first doc", "second doc"]


def test_parquet_text_in_every_arrow_layout(tmp_path):
    """Dictionary-encoded text (pandas' category columns) and string views are text: they were refused."""
    import pyarrow
    import pyarrow.parquet as parquet

    layouts = {"category": pyarrow.array(["doc a", None, "doc b"]).dictionary_encode()}
    if hasattr(pyarrow, "string_view"):  # pyarrow >= 16
        layouts["view"] = pyarrow.array(["doc a", None, "doc b"], type=pyarrow.string_view())
    for name, column in layouts.items():
        parquet.write_table(pyarrow.table({"text": column}), tmp_path / f"{name}.parquet")
        assert read_file(tmp_path / f"{name}.parquet") == ["doc a", "doc b"], name
    parquet.write_table(pyarrow.table({"text": pyarrow.array([1, 2])}), tmp_path / "ids.parquet")
    with pytest.raises(DataError, match="column 'text' holds int64, expected text"):
        read_file(tmp_path / "ids.parquet")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n\n  \n", "no text found"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": broken}\n', "line 2: not valid JSON"),
        ("pretty.json", '{\n  "text": "x"\n}\n', "one JSON value over several lines; expected JSON lines"),
        ("twice.csv", "text,text\na,b\n", "the header names column\\(s\\) 'text' more than once"),
        ("extra.csv", "text\nhello, world\n", "line 2: 2 cells, the header has 1"),
        ("unclosed.csv", 'text\n"unterminated\nsecond\n', "malformed CSV"),
        ("field.jsonl", '{"body": "x"}\n', "no 'text' field"),
        ("column.csv", "id,body\n1,x\n", r"no 'text' column \(columns: id, body\)"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
        ("corrupt.parquet", b"PAR1 not really parquet", "not a readable Parquet file"),
        ("number.jsonl", '{"text": 5}\n', "holds int, expected text"),
    ],
)
def test_unreadable_or_empty_files_give_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as raised:
        load_documents(str(path))
    assert str(path) in str(raised.value)  # the message names the file


def test_corpus_files_read_as_the_fine_tuner_reads_them(tmp_path):
    """One reader (fastmini.data.tables) for every data file: a TSV is not quoted (a quote mark opening a text
    swallowed the rows up to the next one), JSON lines keep U+2028 inside their strings, a paragraph ends at a
    line of spaces too, and hidden folders of a directory (notebook checkpoints) are no corpus."""
    (tmp_path / "q.tsv").write_text('text\tsource\n"Quoted" said he\twiki\nsecond\twiki\n')
    assert load_documents(str(tmp_path / "q.tsv"))["text"] == ['"Quoted" said he', "second"]
    (tmp_path / "u.jsonl").write_text('{"text": "the cat\u2028sat"}\n{"text": "two"}\n', encoding="utf-8")
    assert load_documents(str(tmp_path / "u.jsonl"))["text"] == ["the cat\u2028sat", "two"]
    (tmp_path / "p.txt").write_text("p1 l1\np1 l2\n  \np2 l1\n")
    assert load_documents(str(tmp_path / "p.txt"), text_unit="paragraph")["text"] == ["p1 l1\np1 l2", "p2 l1"]
    notebooks = tmp_path / "nb"
    (notebooks / ".ipynb_checkpoints").mkdir(parents=True)
    (notebooks / "corpus.txt").write_text("one\ntwo\n")
    (notebooks / ".ipynb_checkpoints" / "corpus-checkpoint.txt").write_text("one\ntwo\n")
    assert load_documents(str(notebooks))["text"] == ["one", "two"]


def test_missing_paths_and_empty_directories(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_documents(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="holds no"):
        load_documents(str(tmp_path))
    with pytest.raises(DataError, match="matches no files"):
        load_documents(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match="text unit"):
        load_documents(str(tmp_path), text_unit="sentence")


@pytest.mark.slow
def test_offline_default_is_the_gensim_wikipedia_sample_without_markup():
    documents = load_documents(DEFAULT_DATA)
    assert len(documents) > 100
    text = "\n".join(documents["text"])
    assert "Anarchism is a political philosophy" in text
    assert "'''" not in text and "''" not in text and "==" not in text and "[[" not in text
    for image_markup in ("File:", "Image:", "alt=", "30px", "__TOC__", ".jpg|"):
        assert image_markup not in text
    assert "ReferencesExternal links" not in text  # headings glued across their blank lines


def test_wiki_headings_keep_their_own_lines_and_image_captions_keep_their_text():
    markup = (
        "Intro.\n\n==History==\n\n\n===Early years===\nBorn.\n"
        "File:Snow.jpg|The range in snow\nA grave|alt=A twin gravestone\nAfrica 30px\n__TOC__\nEnd."
    )
    assert plain_text(markup) == "Intro.\n\nHistory\n\nEarly years\nBorn.\nThe range in snow\nA grave\nAfrica\n\nEnd."
    # a size glued to the caption after it (3 of them in the offline sample)
    assert plain_text("by Kol\u00eb Idromeno|299x299pxAlbanian art") == "by Kol\u00eb Idromeno Albanian art"
    assert plain_text(" 140pxAtlantic sturgeon") == "Atlantic sturgeon"


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl", "a.json", "a.csv"])
def test_a_byte_order_mark_is_not_part_of_the_first_text_or_column_name(tmp_path, name):
    contents = {
        "a.txt": "first\nsecond\n",
        "a.jsonl": '{"text": "first"}\n{"text": "second"}\n',
        "a.json": '[{"text": "first"}, {"text": "second"}]',
        "a.csv": "text,label\nfirst,0\nsecond,1\n",
    }
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + contents[name].encode())
    assert read_file(tmp_path / name) == ["first", "second"]


def test_csv_fields_longer_than_the_csv_modules_default_limit(tmp_path):
    article = "w1 " * 70_000  # 210,000 characters: above csv's default 131,072 per field
    (tmp_path / "long.csv").write_text(f'id,text\n1,"{article}"\n')
    assert read_file(tmp_path / "long.csv") == [article.strip()]


# ---- a datasets name ------------------------------------------------------------------------------


def test_a_datasets_name_is_loaded_with_its_config_split_and_text_field(monkeypatch):
    """A source that is no local path goes to datasets.load_dataset (faked here: no hub in tests) with
    the config and split given; the --text-field column becomes the single `text` column, empty rows go."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no reachability probe of the hub
    requested = []

    def load_dataset(name, config, split, cache_dir=None):
        requested.append((name, config, split, cache_dir))
        return datasets.Dataset.from_dict({"id": [1, 2, 3], "body": ["first doc", "   ", "second doc"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    documents = load_documents(
        "someone/corpus", dataset_config="en", split="train[:10]", text_field="body", cache_dir="/cache"
    )
    assert requested == [("someone/corpus", "en", "train[:10]", "/cache")]
    assert documents.column_names == ["text"] and documents["text"] == ["first doc", "second doc"]


def test_a_datasets_name_without_the_text_field_or_with_only_empty_text_is_a_data_error(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = {"body": ["", "  \n", None]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(rows))
    with pytest.raises(DataError, match=r"dataset 'someone/corpus' \(split 'test'\): no text found"):
        load_documents("someone/corpus", split="test", text_field="body")
    with pytest.raises(DataError, match=r"dataset 'someone/corpus': no 'text' column \(columns: body\)"):
        load_documents("someone/corpus")


def test_a_datasets_name_that_cannot_be_loaded_is_one_data_error_naming_it(monkeypatch):
    """datasets raises many kinds of errors (offline, unknown name, bad split): each becomes one DataError
    with the name, config, split and the first line of datasets' own message."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def load_dataset(name, config, split, cache_dir=None):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError) as raised:
        load_documents("someone/corpus", dataset_config="en", split="validation")
    message = str(raised.value)
    assert "'someone/corpus' is not a local file or directory" in message
    assert "config 'en', split 'validation'" in message and "Couldn't reach 'someone/corpus'" in message
    assert "more detail" not in message and isinstance(raised.value.__cause__, ConnectionError)
