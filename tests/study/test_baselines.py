"""The baseline selection (study.baselines): it never reads the evaluation data, its validation split is
carved stratified from the training pool and disjoint from the training subset, which is the factorial's own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets import Dataset

import hf_dreg.recipes.data as data_module
from hf_dreg.recipes.classification import DataArguments
from hf_dreg.recipes.data import select_samples_per_class
from study.baselines import SelectionConfig, carve_validation, choose, run_selection, selection_splits

CLASS_SIZES = (60, 25, 40)  # an imbalanced pool of 8x8 grayscale images, 3 classes


def _images(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(CLASS_SIZES)])
    labels = rng.permutation(labels)
    images = (rng.random((len(labels), 8, 8)) * 60).astype(np.uint8)
    for i, c in enumerate(labels):  # a learnable signal: a bright row per class, and a unique id in pixel (0, 0)
        images[i, 2 + 2 * c] = 250
        images[i, 0, 0] = i % 256
        images[i, 0, 1] = i // 256
    return images, labels.astype(np.int64)


@pytest.fixture
def image_dir(tmp_path):
    """train.npz (the pool) beside a test.npz and a validation file that are not even readable."""
    folder = tmp_path / "tiny_images"
    folder.mkdir()
    images, labels = _images()
    np.savez(folder / "train.npz", images=images, labels=labels)
    (folder / "test.npz").write_bytes(b"not an npz: reading the test split is a bug")
    (folder / "validation.jsonl").write_text("not json either\n")
    return folder


def _image_id(image) -> int:
    array = np.asarray(image)
    return int(array[0, 0]) + 256 * int(array[0, 1])


def test_carved_validation_is_stratified_and_disjoint(image_dir):
    args = DataArguments(data_dir=str(image_dir), samples_per_class=10)
    splits, info = selection_splits(args, seed=3, validation_size=30)
    train_ids = {_image_id(im) for im in splits["train"]["image"]}
    val_ids = [_image_id(im) for im in splits["validation"]["image"]]
    assert len(train_ids) == 30 and len(val_ids) == 30 == len(set(val_ids))
    assert train_ids.isdisjoint(val_ids)
    # the training subset is the factorial's: select_samples_per_class on the same pool with the same seed
    images, labels = _images()
    pool = Dataset.from_dict({"id": list(range(len(labels))), "label": labels})
    assert train_ids == set(select_samples_per_class(pool, 10, "label", 3)["id"])
    # stratified: the class proportions of the examples left after the subset, to within one example
    rest = np.array([n - 10 for n in CLASS_SIZES])
    counts = np.bincount(splits["validation"]["label"], minlength=3)
    assert np.all(np.abs(counts - 30 * rest / rest.sum()) <= 1), counts
    assert info["validation_class_counts"] == {str(c): int(n) for c, n in enumerate(counts)}


def test_carve_validation_never_takes_excluded_examples():
    labels = np.array([0] * 50 + [1] * 10)
    exclude = np.arange(0, 60, 2)
    for seed in range(5):
        held = carve_validation(labels, exclude, 12, seed)
        assert not set(held) & set(exclude)
        assert np.bincount(labels[held], minlength=2).tolist() == [10, 2]


def test_label_noise_only_on_the_training_subset(image_dir):
    args = DataArguments(data_dir=str(image_dir), samples_per_class=10, label_noise=0.5)
    splits, info = selection_splits(args, seed=0, validation_size=30)
    _, labels = _images()
    assert info["labels_flipped"] > 0
    assert [labels[_image_id(im)] for im in splits["validation"]["image"]] == splits["validation"]["label"]
    assert [labels[_image_id(im)] for im in splits["train_clean"]["image"]] == splits["train_clean"]["label"]
    assert splits["train"]["label"] != splits["train_clean"]["label"]


def test_selection_never_reads_the_test_split(image_dir, tmp_path, monkeypatch):
    read = []
    original = data_module.load_file
    monkeypatch.setattr(data_module, "load_file", lambda path, flag="--train_file": read.append(Path(path).name) or original(path, flag))
    config = {
        "results": str(tmp_path / "selection.jsonl"),
        "base": {"seed": 0, "regularizer": "none", "num_attention_heads": 2, "lr_scheduler_type": "constant_with_warmup",
                 "warmup_steps": 1, "per_device_train_batch_size": 8, "use_cpu": True, "validation_size": 15, "eval_at": [2, 4]},
        "datasets": [{"name": "tiny", "model_type": "vit", "patch_size": 4, "data_dir": str(image_dir), "samples_per_class": 5,
                      "validation_file": str(image_dir / "validation.jsonl")}],
        "settings": [{"name": "h8", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "learning_rate": 1e-2}],
    }  # fmt: skip
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(config))
    records = run_selection(SelectionConfig.from_yaml(path), progress=False)
    assert read == ["train.npz"]
    (record,) = records
    assert [p["step"] for p in record["curve"]] == [2, 4]
    for point in record["curve"]:
        assert 0 <= point["train_accuracy"] <= 1 and 0 <= point["val_accuracy"] <= 1
        assert point["gap"] == pytest.approx(point["train_accuracy"] - point["val_accuracy"])
        assert point["train_seconds"] >= 0
    assert record["data"]["validation_examples"] == 15 and record["data"]["train_examples"] == 15
    # resumable: a second call finds the cell done and trains nothing
    assert run_selection(SelectionConfig.from_yaml(path), progress=False) == []
    assert len((tmp_path / "selection.jsonl").read_text().splitlines()) == 1


def _record(setting, curve, n=400):
    points = [{"step": s, "train_accuracy": t, "val_accuracy": v, "train_seconds": float(s), "gap": t - v} for s, t, v in curve]
    return {"axes": {"dataset": "d", "setting": setting}, "data": {"validation_examples": n}, "curve": points, "config": {"s": setting}}


def test_choose_prefers_the_cheapest_plateau_within_one_standard_error():
    # se at 0.80 on 400 examples = 0.02. "big" is best (0.81) but "small" reaches 0.80 at its plateau, cheaper.
    records = [
        _record("small", [(100, 0.70, 0.60), (300, 1.00, 0.80), (600, 1.00, 0.795)]),
        _record("big", [(100, 0.90, 0.70), (300, 0.95, 0.78), (600, 1.00, 0.81)]),
    ]
    result = choose(records)
    assert (result["chosen"]["setting"], result["chosen"]["step"]) == ("small", 300)
    assert (result["best"]["setting"], result["best"]["step"]) == ("big", 600)
    assert result["chosen"]["plateau"] and result["config"] == {"s": "small"}


def test_choose_skips_points_still_rising_or_not_fitted():
    # step 300 is within one SE but its run still rises by more than one SE later; step 100 has not fitted the data
    records = [_record("r", [(100, 0.80, 0.79), (300, 0.99, 0.80), (600, 0.995, 0.83)])]
    result = choose(records)
    assert result["chosen"]["step"] == 600


def test_choose_without_a_plateau_takes_the_best_fitted_candidate():
    # nothing fits its training set; step 300 (0.79) and 600 (0.80) are within one SE: 600 has fitted more
    records = [_record("r", [(100, 0.40, 0.70), (300, 0.60, 0.79), (600, 0.80, 0.80)])]
    result = choose(records)
    assert result["chosen"]["step"] == 600 and not result["chosen"]["plateau"] and result["at_plateau"] == 0


def test_competent_config_cells_parse():
    """Every (data set, regularizer) of the generated factorial config is a valid run."""
    from transformers import HfArgumentParser

    from hf_dreg.recipes.models import ModelArguments
    from hf_dreg.training_args import DREGTrainingArguments
    from study.sweep import SweepConfig, expand_grid

    path = Path(__file__).resolve().parents[2] / "study" / "configs" / "sweep_competent.yaml"
    if not path.is_file():
        pytest.skip("study/configs/sweep_competent.yaml not generated yet")
    config = SweepConfig.from_yaml(path)
    seen = set()
    parser = HfArgumentParser((ModelArguments, DataArguments, DREGTrainingArguments))
    for cell in expand_grid(config):
        axes = dict(cell.key)
        if (axes["dataset"], axes["regularizer"]) in seen:
            continue
        seen.add((axes["dataset"], axes["regularizer"]))
        _, _, args = parser.parse_dict({"output_dir": "unused", **cell.flags})
        if axes["regularizer"].endswith(("auto_r0.1", "auto_r0.01")):
            assert args.auto_strength and args.dreg_recalibrate_steps > 0
    assert len(seen) == len(config.grid["dataset"]) * len(config.grid["regularizer"])
    assert list(config.grid)[0] == "seed"
    json.dumps(config.grid)  # plain data


def test_measured_cost_plans_with_the_factorial_s_own_runs(tmp_path):
    """The factorial's measured wall time replaces the estimate of the data sets it has run."""
    from hf_dreg.recipes.results_store import append_result
    from study import baselines_report as br

    path = tmp_path / "results.jsonl"
    for seconds in (100.0, 140.0):
        append_result(path, {"axes": {"dataset": "mnist", "seed": "0"}, "wall_time_s": seconds})
    append_result(path, {"axes": {"dataset": "sst2", "seed": "0"}, "wall_time_s": 20.0})
    measured = br.measured_cost(path)
    per_seed = len(br.ACTIVATIONS) * len(br.REGULARIZER_AXIS)
    assert measured["runs"] == 3 and measured["mean_run_s"] == {"mnist": 120.0, "sst2": 20.0}
    assert measured["seed_hours_on_cores"]["mnist"] == pytest.approx(120.0 * per_seed / br.CORES / 3600)
    assert br.measured_cost(tmp_path / "absent.jsonl") is None
    seeds = len(br.SEEDS)
    estimate = {"hours_on_cores": 1.0, "measured": measured,
                "per_dataset_s": {"mnist": 3600.0 * br.CORES * seeds, "sst2": 0.0, "trec6": 3600.0 * br.CORES * seeds}}
    full = measured["seed_hours_on_cores"]["mnist"] + measured["seed_hours_on_cores"]["sst2"] + 1.0  # trec6: its estimate
    three_seeds_all = br._reduced(estimate)[0]
    assert f"{full * 3:.1f} h" in three_seeds_all, three_seeds_all
