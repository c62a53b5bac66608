"""hf_dreg.recipes.data: loading (hub-free), column checks, few-shot subsets, label noise, input noise, VADER."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from PIL import Image

from hf_dreg.recipes.data import (
    add_image_noise,
    add_text_noise,
    apply_label_noise,
    check_columns,
    load_raw_datasets,
    select_samples_per_class,
    vader_lexicon_dataset,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _shared_data_dir() -> Path | None:
    """``$HF_DREG_SHARED_DATA`` or ``<repo>/../shared/data`` (the real small data sets), if present."""
    env = os.environ.get("HF_DREG_SHARED_DATA")
    candidates = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[3] / "shared" / "data"]
    return next((path for path in candidates if path.is_dir()), None)


@pytest.fixture(scope="module")
def real_data() -> Path:
    path = _shared_data_dir()
    if path is None:
        pytest.skip(
            "real data not available: set $HF_DREG_SHARED_DATA or provide "
            f"{Path(__file__).resolve().parents[3] / 'shared' / 'data'}"
        )
    return path


def _real(real_data: Path, name: str, *files: str) -> Path:
    folder = real_data / name
    for file in files:
        if not (folder / file).is_file():
            pytest.skip(f"real data not available: {folder / file} does not exist")
    return folder


def _toy(n_per_class=(5, 7, 3), seed=0) -> Dataset:
    labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]
    rng = np.random.default_rng(seed)
    labels = rng.permutation(labels).tolist()
    names = ["a", "b", "c", "d", "e", "f"][: len(n_per_class)]
    ds = Dataset.from_dict({"text": [f"x{i}" for i in range(len(labels))], "label": labels})
    return ds.cast_column("label", ClassLabel(names=names))


# ---- load_raw_datasets ---------------------------------------------------------------------------


def test_load_jsonl_files_with_label_names(real_data):
    folder = _real(real_data, "sst2", "train.jsonl", "test.jsonl", "labels.json")
    raw = load_raw_datasets(train_file=str(folder / "train.jsonl"), validation_file=str(folder / "test.jsonl"))
    assert isinstance(raw, DatasetDict) and {"train", "validation"} <= set(raw)
    assert raw["train"].num_rows == 10_000 and raw["validation"].num_rows == 872
    assert raw["train"].features["label"] == ClassLabel(names=["negative", "positive"])
    assert set(raw["train"].column_names) == {"text", "label"}


def test_load_data_dir_of_split_files_uses_test_as_validation(real_data):
    folder = _real(real_data, "trec6", "train.jsonl", "test.jsonl", "labels.json")
    raw = load_raw_datasets(data_dir=str(folder))
    assert raw["validation"].num_rows == raw["test"].num_rows == 500
    names = json.loads((folder / "labels.json").read_text())
    assert raw["validation"].features["label"].names == names


@pytest.mark.parametrize("name,mode,size", [("mnist", "L", (28, 28)), ("cifar10", "RGB", (32, 32))])
def test_load_npz_images(real_data, name, mode, size):
    folder = _real(real_data, name, "test.npz", "labels.json")
    raw = load_raw_datasets(train_file=str(folder / "test.npz"), validation_file=str(folder / "test.npz"))
    first = raw["train"][0]
    assert isinstance(first["image"], Image.Image) and first["image"].mode == mode and first["image"].size == size
    assert raw["train"].features["label"].num_classes == 10
    with np.load(folder / "test.npz") as arrays:
        assert raw["train"].num_rows == len(arrays["labels"])
        assert np.array_equal(np.asarray(first["image"]), arrays["images"][0])
        assert raw["train"]["label"][:50] == arrays["labels"][:50].tolist()


def test_load_npz_synthetic_without_label_names(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(tmp_path / "val.npz", images=images[:2], labels=np.array([0, 1]))
    raw = load_raw_datasets(data_dir=str(tmp_path))
    assert raw["train"].num_rows == 6 and raw["validation"].num_rows == 2
    assert np.array_equal(np.asarray(raw["train"][3]["image"]), images[3])
    assert not isinstance(raw["train"].features["label"], ClassLabel)


def test_load_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 3, 3), dtype=np.uint8), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="images"):
        load_raw_datasets(train_file=str(tmp_path / "train.npz"), validation_file=str(tmp_path / "train.npz"))


def test_load_csv_files_with_labels_json(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,1\nbad,0\nfine,1\n")
    (tmp_path / "dev.csv").write_text("text,label\nawful,0\n")
    (tmp_path / "labels.json").write_text(json.dumps(["neg", "pos"]))
    raw = load_raw_datasets(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.csv"))
    assert raw["train"]["text"] == ["good", "bad", "fine"]
    assert raw["validation"].features["label"].names == ["neg", "pos"]


def test_load_imagefolder(tmp_path):
    for split, count in (("train", 2), ("validation", 1)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (4, 4), (i * 50, 0, 0)).save(folder / f"{i}.png")
    raw = load_raw_datasets(data_dir=str(tmp_path))
    assert raw["train"].num_rows == 4 and raw["validation"].num_rows == 2
    assert raw["train"].features["label"].names == ["cat", "dog"]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="No data given"):
        load_raw_datasets()
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(ValueError, match="validation"):
        load_raw_datasets(train_file=str(tmp_path / "train.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_raw_datasets(train_file=str(tmp_path / "nope.jsonl"), validation_file=str(tmp_path / "train.jsonl"))
    (tmp_path / "train.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"--train_file .*train\.txt: unknown file format '\.txt'.*\.parquet"):
        load_raw_datasets(train_file=str(tmp_path / "train.txt"), validation_file=str(tmp_path / "train.jsonl"))


def test_one_file_loader_for_every_script(tmp_path):
    """Classification reads .parquet like the generative scripts do (one data layer), and both name the flag."""
    from datasets import Dataset

    from hf_dreg.recipes.data import DatasetArguments, load_splits

    Dataset.from_dict({"text": ["a b", "c", "d e f"], "label": [0, 1, 0]}).to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "dev.jsonl").write_text('{"text": "g", "label": 1}\n')
    raw = load_raw_datasets(train_file=str(tmp_path / "train.parquet"), validation_file=str(tmp_path / "dev.jsonl"))
    assert raw["train"]["text"] == ["a b", "c", "d e f"] and raw["validation"]["label"] == [1]
    train, _, _ = load_splits(DatasetArguments(train_file=str(tmp_path / "train.parquet"), validation_split_percentage=0), seed=0)
    assert train["text"] == raw["train"]["text"]
    for load in (lambda: load_raw_datasets(train_file=str(tmp_path / "no.csv"), validation_file=str(tmp_path / "dev.jsonl")),
                 lambda: load_splits(DatasetArguments(train_file=str(tmp_path / "no.csv")), seed=0)):
        with pytest.raises(FileNotFoundError, match=r"--train_file .*no\.csv: no such file"):
            load()


def test_dataset_config_has_one_name_in_every_script():
    """--dataset_config_name everywhere (classification, SFT, seq2seq); TRL's --dataset_config is its alias."""
    from transformers import HfArgumentParser

    from hf_dreg.recipes.classification import DataArguments
    from hf_dreg.recipes.data import DatasetArguments

    assert "dataset_config_name" in DataArguments.__dataclass_fields__
    assert "dataset_config" not in DatasetArguments.__dataclass_fields__
    for flag in ("--dataset_config_name", "--dataset_config"):
        (args,) = HfArgumentParser(DatasetArguments).parse_args_into_dataclasses(["--dataset_name", "cnn_dailymail", flag, "3.0.0"])
        assert args.dataset_config_name == "3.0.0"


# ---- check_columns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "column,flag", [("sentence", "--text_column"), ("labels", "--label_column"), ("img", "--image_column")]
)
def test_check_columns_names_missing_column_existing_columns_and_flag(column, flag):
    ds = _toy()
    with pytest.raises(ValueError) as error:
        check_columns(ds, "text", column)
    message = str(error.value)
    assert repr(column) in message and "['text', 'label']" in message and flag in message


def test_check_columns_on_dataset_dict_names_the_split_and_accepts_flag_override():
    raw = DatasetDict({"train": _toy(), "validation": _toy().rename_column("text", "sentence")})
    check_columns(raw["train"], "text", "label")
    with pytest.raises(ValueError, match="'validation' split.*--my_flag"):
        check_columns(raw, "text", flags={"text": "--my_flag"})


# ---- select_samples_per_class --------------------------------------------------------------------


def test_select_samples_per_class_is_stratified_and_seeded():
    ds = _toy((5, 7, 3))
    subset = select_samples_per_class(ds, 3, seed=1)
    assert Counter(subset["label"]) == {0: 3, 1: 3, 2: 3}
    assert subset["text"] == select_samples_per_class(ds, 3, seed=1)["text"]
    draws = {tuple(sorted(select_samples_per_class(ds, 3, seed=s)["text"])) for s in range(6)}
    assert len(draws) > 1
    assert len(set(subset["text"])) == 9


def test_select_samples_per_class_names_the_short_class():
    with pytest.raises(ValueError, match=r"Class 2 \('c'\) has 3 examples, fewer than the 4"):
        select_samples_per_class(_toy((5, 7, 3)), 4)


def test_select_samples_per_class_counts_empty_classlabel_classes():
    ds = _toy((2, 2)).cast_column("label", ClassLabel(names=["a", "b", "never"]))
    with pytest.raises(ValueError, match="'never'.* has 0 examples"):
        select_samples_per_class(ds, 1)


def test_select_samples_per_class_on_real_data(real_data):
    folder = _real(real_data, "ag_news", "test.jsonl", "labels.json")
    raw = load_raw_datasets(train_file=str(folder / "test.jsonl"), validation_file=str(folder / "test.jsonl"))
    subset = select_samples_per_class(raw["train"], 16, seed=0)
    assert Counter(subset["label"]) == {c: 16 for c in range(4)}


# ---- apply_label_noise ---------------------------------------------------------------------------


def test_label_noise_zero_and_one():
    ds = _toy((50, 50, 50))
    same, flipped = apply_label_noise(ds, 0.0)
    assert flipped == 0 and same["label"] == ds["label"]
    noisy, flipped = apply_label_noise(ds, 1.0)
    assert flipped == 150 and all(a != b for a, b in zip(noisy["label"], ds["label"]))
    assert noisy.features == ds.features


def test_label_noise_is_symmetric_seeded_and_counted():
    ds = _toy((2000, 2000, 2000, 2000))
    noisy, flipped = apply_label_noise(ds, 0.3, seed=3)
    before, after = np.asarray(ds["label"]), np.asarray(noisy["label"])
    assert flipped == int((before != after).sum())
    assert abs(flipped / len(ds) - 0.3) < 0.03
    for c in range(4):  # a flipped label of class c lands uniformly on the three other classes
        targets = Counter(after[(before == c) & (after != before)].tolist())
        assert set(targets) == set(range(4)) - {c}
        shares = np.array(list(targets.values())) / sum(targets.values())
        assert np.all(np.abs(shares - 1 / 3) < 0.06)
    again, _ = apply_label_noise(ds, 0.3, seed=3)
    other, _ = apply_label_noise(ds, 0.3, seed=4)
    assert again["label"] == noisy["label"] and other["label"] != noisy["label"]
    assert noisy["text"] == ds["text"]


def test_label_noise_without_classlabel_uses_present_values():
    ds = Dataset.from_dict({"label": [3, 7] * 20})
    noisy, flipped = apply_label_noise(ds, 1.0)
    assert flipped == 40 and noisy["label"] == [7, 3] * 20


def test_label_noise_rejects_bad_p():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_label_noise(_toy(), 1.5)


# ---- input noise ---------------------------------------------------------------------------------

SPECIAL = [0, 1, 2, 3]  # pad, cls, sep, mask in this toy vocabulary


def _batch():
    input_ids = torch.tensor([[1, 10, 11, 12, 2, 0, 0], [1, 20, 3, 21, 22, 23, 2]])
    attention_mask = (input_ids != 0).long()
    return input_ids, attention_mask


def test_text_noise_keeps_specials_and_padding_and_is_seeded():
    input_ids, attention_mask = _batch()
    noisy = add_text_noise(input_ids, attention_mask, 1.0, 50, SPECIAL, torch.Generator().manual_seed(0))
    special = torch.isin(input_ids, torch.tensor(SPECIAL)) | (attention_mask == 0)
    assert torch.equal(noisy[special], input_ids[special])
    assert not torch.isin(noisy[~special], torch.tensor(SPECIAL)).any()
    assert (noisy[~special] != input_ids[~special]).float().mean() > 0.8
    assert noisy.dtype == input_ids.dtype and noisy.shape == input_ids.shape
    again = add_text_noise(input_ids, attention_mask, 1.0, 50, SPECIAL, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    same = add_text_noise(input_ids, attention_mask, 0.0, 50, SPECIAL, torch.Generator().manual_seed(0))
    assert torch.equal(same, input_ids)


def test_text_noise_rate_and_mask_respected():
    input_ids = torch.randint(4, 1000, (200, 64), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 48:] = 0
    noisy = add_text_noise(input_ids, attention_mask, 0.2, 1000, SPECIAL, torch.Generator().manual_seed(2))
    changed = noisy != input_ids
    assert not changed[:, 48:].any()
    assert abs(changed[:, :48].float().mean().item() - 0.2) < 0.02
    assert int(noisy.max()) < 1000


def test_image_noise_std_and_seed():
    pixels = torch.zeros(64, 3, 32, 32)
    noisy = add_image_noise(pixels, 0.5, torch.Generator().manual_seed(0))
    assert abs(noisy.std().item() - 0.5) < 0.01 and abs(noisy.mean().item()) < 0.01
    assert torch.equal(noisy, add_image_noise(pixels, 0.5, torch.Generator().manual_seed(0)))
    assert torch.equal(add_image_noise(pixels, 0.0, torch.Generator().manual_seed(0)), pixels)
    assert torch.equal(pixels, torch.zeros_like(pixels))  # input left untouched
    half = add_image_noise(pixels.half(), 0.5, torch.Generator().manual_seed(0))
    assert half.dtype == torch.float16
    with pytest.raises(ValueError):
        add_image_noise(pixels, -1.0, torch.Generator())


# ---- the VADER lexicon data set ------------------------------------------------------------------


@pytest.fixture(scope="module")
def vader():
    pytest.importorskip("vaderSentiment", reason="the package vaderSentiment is not installed")
    return vader_lexicon_dataset(seed=0)


def test_vader_dataset_splits_labels_and_words(vader):
    assert set(vader) == {"train", "validation"}
    assert vader["train"].features["label"].names == ["negative", "positive"]
    assert Counter(vader["validation"]["label"]) == {0: 300, 1: 300}
    assert not set(vader["train"]["text"]) & set(vader["validation"]["text"])
    counts = Counter(vader["train"]["label"])
    assert counts[0] > 1000 and counts[1] > 1000
    for split in vader.values():
        ratings, labels = np.asarray(split["rating"]), np.asarray(split["label"])
        assert np.all(np.abs(ratings) >= 1.5 - 1e-6)
        assert np.array_equal(labels, (ratings > 0).astype(int))
        assert all(any(ch.isalpha() for ch in w) and not any(ch.isdigit() for ch in w) for w in split["text"])
    words = set(vader["train"]["text"]) | set(vader["validation"]["text"])
    assert {"good", "bad"} <= words or len(words) > 3000
    assert ":)" not in words and ":-(" not in words


def test_vader_dataset_is_seeded_and_threshold_applies(vader):
    again = vader_lexicon_dataset(seed=0)
    assert again["validation"]["text"] == vader["validation"]["text"]
    assert vader_lexicon_dataset(seed=1)["validation"]["text"] != vader["validation"]["text"]
    strict = vader_lexicon_dataset(seed=0, threshold=2.5, validation_per_class=50)
    assert np.all(np.abs(np.asarray(strict["train"]["rating"])) >= 2.5 - 1e-6)
    assert strict["train"].num_rows + 100 < vader["train"].num_rows + 600
    with pytest.raises(ValueError, match="threshold"):
        vader_lexicon_dataset(threshold=0)


def test_an_empty_file_is_an_error_naming_the_flag_in_every_loader(tmp_path):
    """An empty (or blank) training file: not the JSON builder's bare StopIteration, in every script's loader."""
    from hf_dreg.recipes.data import DatasetArguments, load_splits

    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "dev.jsonl").write_text('{"text": "g", "label": 1}\n')
    for name in ("empty.jsonl", "empty.csv"):
        with pytest.raises(ValueError, match=rf"--train_file .*{name}: the file is empty"):
            load_raw_datasets(train_file=str(tmp_path / name), validation_file=str(tmp_path / "dev.jsonl"))
        with pytest.raises(ValueError, match=rf"--train_file .*{name}: the file is empty"):
            load_splits(DatasetArguments(train_file=str(tmp_path / name)), seed=0)
    with pytest.raises(ValueError, match=r"--validation_file .*empty\.jsonl: the file is empty"):
        load_raw_datasets(train_file=str(tmp_path / "dev.jsonl"), validation_file=str(tmp_path / "empty.jsonl"))
