"""Does DREG help on my data, at its best strength, against plain fine-tuning?

``run_tune(model_args, data_args, training_args, tune_args)`` (behind ``scripts/tune.py``):

1. loads the data as :mod:`hf_dreg.recipes.classification` does (the low-data options apply to the training split);
   the user's evaluation split is the **test set**, and it is not looked at until step 3;
2. scores the trials on the *training* data only: a carved stratified validation split, or, for a small
   training set (``search_folds``, default ``auto``), stratified k-fold cross-validation, where each trial
   trains once per fold and its score is the mean over the folds (every training example validated once);
   ``Trainer.hyperparameter_search`` runs over :class:`~hf_dreg.search_space.DREGSearchSpace`: Optuna
   (default) with a persistent storage (``sqlite:///<output_dir>/study.db``), so that a killed search
   resumes where it stopped (``n_trials`` is the total: a rerun runs only the trials still missing), or
   Ray Tune (``backend="ray"``, on a cluster with ``address``);
3. retrains the best setting and plain fine-tuning (``dreg_lambda=0``) on the full training data for
   every seed of ``seeds``, evaluates both on the test set, and compares them paired by seed: a
   Wilcoxon signed-rank test (scipy), a Markdown table (``TUNE_REPORT.md``), a plot of the metric per
   seed with paired lines (``paired_<metric>.png``) and a JSON of every run (``tune_results.json``;
   ``runs.jsonl`` holds each finished retraining run, so a rerun skips them).

The training data is fixed by ``data_seed`` (or ``seed``) for the whole run; the seeds of step 3 change
the initialisation and the order of the batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import transformers as tf
from datasets import Dataset
from tqdm.auto import tqdm

from ..config import REGULARIZERS
from ..metrics import classification_metrics
from ..search_space import LAMBDA_RANGE, DREGSearchSpace
from ..trainer import DREGTrainer
from ..training_args import DREGTrainingArguments
from .arguments import CLASSIFICATION_ARGUMENTS, parse_arguments
from .classification import DataArguments, prepare_splits
from .featurize import Featurizer
from .models import ModelArguments
from .provenance import versions
from .results_store import append_result, read_results

logger = tf.utils.logging.get_logger(__name__)

BACKENDS = ("optuna", "ray")
PLAIN = {"regularizer": "dreg", "dreg_lambda": 0.0}
RESULTS_FILE = "tune_results.json"
RUNS_FILE = "runs.jsonl"
REPORT_FILE = "TUNE_REPORT.md"
# search_folds 'auto': k-fold cross-validation when a class has fewer training examples than this (a single
# split of 0.2 would score the trials on fewer than 10 examples of it)
AUTO_FOLDS_BELOW = 50


@dataclass
class TuneArguments:
    """The search (on a validation split carved from the training data) and the paired retraining."""

    n_trials: int = field(
        default=20,
        metadata={"help": "Trials of the search in total: a rerun with the same storage runs only the ones still missing."},
    )
    backend: str = field(default="optuna", metadata={"help": "optuna (default) or ray (Ray Tune).", "choices": list(BACKENDS)})
    storage: str | None = field(
        default=None,
        metadata={
            "help": "Optuna storage URL (default sqlite:///<output_dir>/study.db, so a killed search resumes); "
            "'memory' for an in-memory study."
        },
    )
    study_name: str = field(default="hf_dreg_tune", metadata={"help": "Name of the Optuna study (Ray: of the experiment)."})
    sampler_seed: int = field(default=0, metadata={"help": "Seed of Optuna's TPE sampler."})
    validation_fraction: float = field(
        default=0.2, metadata={"help": "Share of the training data held out (stratified) to score the trials."}
    )
    search_folds: str = field(
        default="auto",
        metadata={
            "help": "How each trial is scored. An integer k >= 2: stratified k-fold cross-validation of the training data "
            "(each trial trains k times, on k-1 folds, is scored on the held-out fold, and its score is the mean over the "
            "folds: every training example is validated once). 1: one stratified --validation_fraction split. 'auto' "
            f"(default): k-fold with k = round(1 / validation_fraction) (5 at 0.2) when a class has fewer than "
            f"{AUTO_FOLDS_BELOW} training examples, else the single split."
        },
    )
    search_fold_repeats: int = field(
        default=1,
        metadata={"help": "k-fold: repeat the folds with new stratified shuffles; each trial trains k x repeats times."},
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        metadata={"help": "Seeds of the final runs: the best setting and plain fine-tuning are retrained with each."},
    )
    search_lambda_min: float = field(default=LAMBDA_RANGE[0], metadata={"help": "Smallest dreg_lambda searched (log-uniform)."})
    search_lambda_max: float = field(
        default=LAMBDA_RANGE[1],
        metadata={"help": "Largest dreg_lambda searched (1e3 spans small models from scratch; 10 is enough for a pretrained MiniLM)."},
    )
    search_regularizers: list[str] = field(
        default_factory=lambda: ["dreg"],
        metadata={"help": f"Regularizers searched (each with its own strength): any of {', '.join(REGULARIZERS)}."},
    )
    search_metric: str = field(
        default="accuracy",
        metadata={"help": "Metric chosen on and compared: accuracy, macro_f1 (maximised) or loss (minimised)."},
    )
    address: str | None = field(default=None, metadata={"help": "Ray: the cluster address (default: a local Ray instance)."})
    num_cpus_per_trial: float = field(default=1.0, metadata={"help": "Ray: CPUs per trial."})
    num_gpus_per_trial: float = field(default=0.0, metadata={"help": "Ray: GPUs per trial."})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.n_trials < 1:
            raise ValueError(f"--n_trials must be >= 1, got {self.n_trials}.")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}.")
        self.search_folds = str(self.search_folds).strip().lower()
        if self.search_folds != "auto" and not (self.search_folds.isdigit() and int(self.search_folds) >= 1):
            raise ValueError(f"--search_folds must be 'auto' or an integer >= 1, got {self.search_folds!r}.")
        if self.search_fold_repeats < 1:
            raise ValueError(f"--search_fold_repeats must be >= 1, got {self.search_fold_repeats}.")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds has repeated seeds: {self.seeds}.")
        if self.search_metric not in ("accuracy", "macro_f1", "loss"):
            raise ValueError(f"--search_metric must be accuracy, macro_f1 or loss, got {self.search_metric!r}.")
        self.search_space()  # validates the ranges and regularizers

    @property
    def direction(self) -> str:
        return "minimize" if self.search_metric == "loss" else "maximize"

    def search_space(self) -> DREGSearchSpace:
        return DREGSearchSpace(self.search_lambda_min, self.search_lambda_max, tuple(self.search_regularizers))

    def folds_for(self, labels) -> int:
        """The number of folds that score each trial on a training set with these ``labels`` (1: the single split)."""
        if self.search_folds != "auto":
            return int(self.search_folds)
        smallest = int(np.unique(np.asarray(labels), return_counts=True)[1].min())
        if smallest >= AUTO_FOLDS_BELOW:
            return 1
        return max(2, min(round(1 / self.validation_fraction), smallest))


# ---- data ----------------------------------------------------------------------------------------


def stratified_split(ds: Dataset, fraction: float, label_column: str = "label", seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(rest, held_out)``: ``fraction`` of ``ds`` held out with the class proportions kept (seeded)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(ds[label_column])
    try:
        rest, held_out = train_test_split(np.arange(len(ds)), test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as error:
        raise ValueError(
            f"Cannot hold out a stratified {fraction:.0%} of the {len(ds)} training examples "
            f"({len(np.unique(labels))} classes): {error} Raise --validation_fraction or train on more examples per class."
        ) from None
    return ds.select(sorted(rest.tolist())), ds.select(sorted(held_out.tolist()))


def stratified_folds(labels, folds: int, repeats: int = 1, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(fit, held_out)]`` index arrays: ``folds`` stratified folds, ``repeats`` times with new shuffles (seeded);
    within a repeat the held-out parts partition the examples, each with the class proportions kept."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if folds < 2 or counts.min() < folds:
        raise ValueError(
            f"Cannot make {folds} stratified folds of the {len(labels)} training examples: class {classes[counts.argmin()].item()!r} "
            f"has {counts.min()}. Pass --search_folds between 2 and {counts.min()} (or 1, the single split)."
        )
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    return [(np.sort(fit), np.sort(held_out)) for fit, held_out in splitter.split(np.zeros(len(labels)), labels)]


# ---- arguments of the runs -----------------------------------------------------------------------


def derive_args(args: DREGTrainingArguments, settings: dict | None = None, **changes) -> DREGTrainingArguments:
    """A copy of ``args`` with ``changes`` and the regularizer ``settings`` (DREGConfig fields).

    The base weight decay is kept for every regularizer but ``weight_decay`` (whose strength is the decay).
    """
    base_weight_decay = 0.0 if args.regularizer == "weight_decay" else args.weight_decay
    values = dict(changes)
    if settings is not None:
        values.update(settings)
        values.setdefault("dreg_lambda", None)  # none: its own default
        values["weight_decay"] = 0.0 if settings["regularizer"] == "weight_decay" else base_weight_decay
    return dataclasses.replace(args, **values)


def _objective(metrics: dict, key: str) -> float:
    if key not in metrics:
        raise KeyError(f"The evaluation reported no {key!r} (it has {sorted(metrics)}).")
    return float(metrics[key])


class Objective:
    """``compute_objective`` of the search: one evaluation metric (picklable, for Ray)."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, metrics: dict) -> float:
        return _objective(metrics, self.key)


class ClassificationMetrics:
    """``compute_metrics`` with accuracy and macro-F1, built where it runs (picklable, for Ray)."""

    def __call__(self, eval_pred):
        if not hasattr(self, "_compute"):
            self._compute = classification_metrics()
        return self._compute(eval_pred)

    def __getstate__(self):
        return {}


class FoldSearchMixin:
    """A trainer whose hyperparameter-search trials are scored by k-fold cross-validation.

    With ``search_folds`` set (``[(fit, held_out)]`` featurized data sets) and called by
    ``hyperparameter_search`` (``train(trial=...)``), :meth:`train` trains the trial's setting once per fold, on
    ``fit`` from a fresh ``model_init`` (the same seed every fold), and evaluates it on ``held_out``; the
    search's following ``evaluate()`` then returns the mean of the fold metrics, so the search's
    ``compute_objective`` (Optuna and Ray alike) gets the mean over the folds. The per-fold scores of
    ``fold_key`` come as ``<fold_key>_fold<i>`` (and an Optuna trial's user attribute ``fold_scores``).
    Within the folds, evaluations during training are not reported to the search (no pruning on one fold);
    a trial resumed from a checkpoint trains its folds again from the start.
    """

    search_folds: list = []
    fold_key: str = "eval_accuracy"

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if trial is None or not self.search_folds or self.hp_search_backend is None:
            return super().train(resume_from_checkpoint, trial=trial, **kwargs)
        self._fold_summary, per_fold, output = None, [], None
        self._in_folds = True
        try:
            for fit, held_out in self.search_folds:
                self.train_dataset, self.eval_dataset = fit, held_out
                output = super().train(None, trial=trial, **kwargs)
                per_fold.append(self.evaluate(held_out))
        finally:
            self._in_folds = False
        scores = [_objective(metrics, self.fold_key) for metrics in per_fold]
        summary = {
            k: float(np.mean([m[k] for m in per_fold]))
            for k in per_fold[0] if all(isinstance(m.get(k), (int, float)) for m in per_fold)
        }  # fmt: skip
        summary.update({f"{self.fold_key}_fold{i}": score for i, score in enumerate(scores)})
        summary[f"{self.fold_key}_folds"] = len(scores)
        self._fold_summary = summary
        self.objective = None  # the search's evaluate() gives the mean over the folds
        if hasattr(trial, "set_user_attr"):  # Optuna
            trial.set_user_attr("fold_scores", scores)
        return output

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        summary = getattr(self, "_fold_summary", None)
        if eval_dataset is None and summary is not None:
            self._fold_summary = None
            return dict(summary)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def _report_to_hp_search(self, trial, step, metrics):
        if getattr(self, "_in_folds", False):
            return
        return super()._report_to_hp_search(trial, step, metrics)


class FoldSearchDREGTrainer(FoldSearchMixin, DREGTrainer):
    """DREGTrainer with :class:`FoldSearchMixin` (module level, so that it pickles by name for Ray)."""


def with_fold_search(trainer_class: type) -> type:
    """``trainer_class`` with :class:`FoldSearchMixin` (its hyperparameter-search trials scored over folds)."""
    if issubclass(trainer_class, FoldSearchMixin):
        return trainer_class
    if trainer_class is DREGTrainer:
        return FoldSearchDREGTrainer
    return type(f"FoldSearch{trainer_class.__name__}", (FoldSearchMixin, trainer_class), {})


# ---- the search ----------------------------------------------------------------------------------


def _optuna_storage(url: str | None, output_dir: str):
    import optuna

    if url == "memory":
        return optuna.storages.InMemoryStorage()
    if url is None:
        url = f"sqlite:///{os.path.abspath(os.path.join(output_dir, 'study.db'))}"
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        # heartbeats: a trial left RUNNING by a killed search is marked failed when the search resumes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=120)
    return url


def _trial_record(trial) -> dict:
    record = {"number": trial.number, "state": trial.state.name, "value": trial.value, "params": trial.params}
    if "fold_scores" in trial.user_attrs:  # k-fold: the score on each fold (the value is their mean)
        record["fold_scores"] = trial.user_attrs["fold_scores"]
    return record


def _strength(params: dict) -> float:
    """The trial's strength (its dreg_lambda; 0 for none), for breaking ties toward the weaker one."""
    for key in ("dreg_lambda", f"{params.get('regularizer')}_lambda"):
        value = params.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0 if params.get("regularizer") == "none" else math.inf


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _scores(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def pick_best(trials, direction: str, validation_items: int | None = None, folds: int = 1, repeats: int = 1):
    """The best finished trial; ties (the same score) go to the weakest strength, with a warning giving the numbers:
    a validation split that cannot tell trials apart should not decide for the stronger one by trial order.
    With ``folds`` > 1 the score is the mean over the folds, ``validation_items`` all the folds' items together."""
    import optuna

    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not done:
        raise ValueError("No trial of the search finished: see the log of the first one for its error.")
    top = max(t.value for t in done) if direction == "maximize" else min(t.value for t in done)
    tied = [t for t in done if abs(t.value - top) <= 1e-12 * max(1.0, abs(top))]
    chosen = min(tied, key=lambda t: (_strength(t.params), t.number))
    if len(tied) > 1 and folds > 1:
        scheme = f"{folds}-fold cross-validation" + (f" repeated {repeats} times" if repeats > 1 else "")
        items = f" on {validation_items} validation items ({scheme}, every training example scored {repeats}x)"
        per_fold = "; ".join(f"trial {t.number}: {_scores(t.user_attrs['fold_scores'])}" for t in tied if "fold_scores" in t.user_attrs)
        logger.warning(
            f"hf_dreg tune: {len(tied)} of {len(done)} trials tied at {top:.6g}{items}: the folds cannot tell them apart"
            + (f" (fold scores {per_fold})" if per_fold else "")
            + f". Taking the weakest strength among them (trial {chosen.number}: {_params(chosen.params)}); more "
            "--search_fold_repeats, a finer --search_metric (loss) or more training data may separate them."
        )
    elif len(tied) > 1:
        items = f" on {validation_items} validation items" if validation_items else ""
        logger.warning(
            f"hf_dreg tune: {len(tied)} of {len(done)} trials tied at {top:.6g}{items}: the validation split cannot tell "
            f"them apart. Taking the weakest strength among them (trial {chosen.number}: {_params(chosen.params)}); "
            "a larger --validation_fraction, --search_folds k (every training example scored) or more training data "
            "separates them."
        )
    return chosen


def search(
    featurizer: Featurizer,
    search_train: Dataset,
    search_validation: Dataset,
    training_args: DREGTrainingArguments,
    tune_args: TuneArguments,
    trainer_class: type = DREGTrainer,
    config: str | None = None,
    folds: list[tuple] | None = None,
    fold_repeats: int = 1,
) -> dict:
    """``hyperparameter_search`` on the carved split; returns the best settings, its score and every trial.

    ``folds`` (``[(fit, held_out)]`` index arrays into ``search_train``, from :func:`stratified_folds`, with
    ``fold_repeats`` repeats; ``search_validation`` is then unused): k-fold cross-validation, each trial trained
    on every ``fit`` and scored on its ``held_out`` (:class:`FoldSearchMixin`), its value the mean over the folds.

    ``config`` (a :func:`fingerprint`) is kept in the Optuna study: resuming a study made with other data,
    model or training flags is refused, and so is resuming it with another number of folds."""
    space = tune_args.search_space()
    args = derive_args(
        training_args, output_dir=os.path.join(training_args.output_dir, "search"), save_strategy="no",
        load_best_model_at_end=False, push_to_hub=False,
    )  # fmt: skip

    key = f"eval_{tune_args.search_metric}"
    fold_data = None
    if folds:
        features = featurizer.features(search_train)
        fold_data = [(features.select(fit), features.select(held_out)) for fit, held_out in folds]

    def make_trainer():
        if fold_data is None:
            return trainer_class(
                model_init=featurizer.model_init,
                args=args,
                train_dataset=featurizer.features(search_train),
                eval_dataset=featurizer.features(search_validation),
                processing_class=featurizer.processor,
                data_collator=featurizer.collator,
                compute_metrics=ClassificationMetrics(),
            )
        trainer = with_fold_search(trainer_class)(
            model_init=featurizer.model_init, args=args, train_dataset=fold_data[0][0], eval_dataset=fold_data[0][1],
            processing_class=featurizer.processor, data_collator=featurizer.collator, compute_metrics=ClassificationMetrics(),
        )  # fmt: skip
        trainer.search_folds, trainer.fold_key = fold_data, key
        return trainer

    common = dict(hp_space=space, direction=tune_args.direction, compute_objective=Objective(key))
    validation_items = len(search_validation) if not folds else int(sum(len(held_out) for _, held_out in folds))
    record = {"backend": tune_args.backend, "metric": key, "direction": tune_args.direction, "space": dataclasses.asdict(space),
              "validation_items": validation_items}  # what every trial was scored on (k-fold: all the folds together)
    n_folds, fold_repeats = (len(folds) // fold_repeats, fold_repeats) if folds else (1, 1)
    if folds:
        record.update(folds=n_folds, fold_repeats=fold_repeats, fold_train_items=[len(fit) for fit, _ in folds],
                      fold_validation_items=[len(held_out) for _, held_out in folds])  # fmt: skip
    if tune_args.backend == "optuna":
        import optuna

        storage = _optuna_storage(tune_args.storage, training_args.output_dir)
        study = optuna.create_study(storage=storage, study_name=tune_args.study_name, load_if_exists=True, direction=tune_args.direction)
        if config is not None:
            made_with = study.user_attrs.get("hf_dreg_config")
            if made_with is None:
                study.set_user_attr("hf_dreg_config", config)
                study.set_user_attr("hf_dreg_metric", key)
                study.set_user_attr("hf_dreg_space", dataclasses.asdict(space))
            elif made_with != config:
                raise ValueError(
                    f"The Optuna study {tune_args.study_name!r} in {tune_args.storage or 'the output folder'} was made with "
                    "other data, model or training flags: its trials do not score this setup. Pass another --study_name "
                    "(or --output_dir / --storage) to start a new study."
                )
        if study.user_attrs.get("hf_dreg_metric", key) != key:
            raise ValueError(
                f"The Optuna study {tune_args.study_name!r} scored its trials by {study.user_attrs['hf_dreg_metric']}, not "
                f"{key}: pass --search_metric {study.user_attrs['hf_dreg_metric'][len('eval_'):]} or another --study_name."
            )
        made_folds = study.user_attrs.get("hf_dreg_folds")
        if made_folds is None:  # a new study; one with trials but no record is from before k-fold: the single split
            made_folds = [1, 1] if study.trials else [n_folds, fold_repeats]
            study.set_user_attr("hf_dreg_folds", made_folds)
        if list(made_folds) != [n_folds, fold_repeats]:
            raise ValueError(
                f"The Optuna study {tune_args.study_name!r} scored its trials "
                + ("on one validation split" if made_folds[0] == 1 else f"by {made_folds[0]}-fold cross-validation x{made_folds[1]}")
                + ", not " + ("on one validation split" if n_folds == 1 else f"by {n_folds}-fold cross-validation x{fold_repeats}")
                + f": pass --search_folds {made_folds[0]} --search_fold_repeats {made_folds[1]}, or another --study_name."
            )
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        before = len([t for t in study.trials if t.state in finished])
        remaining = max(0, tune_args.n_trials - before)
        if remaining:
            logger.warning(f"Optuna study {tune_args.study_name!r}: {before} trials done, running {remaining} more.")
            # seeded by what is already there, so a resumed search does not redraw the first trials' values
            sampler = optuna.samplers.TPESampler(seed=tune_args.sampler_seed + len(study.trials))
            make_trainer().hyperparameter_search(
                backend="optuna", n_trials=remaining, storage=storage, study_name=tune_args.study_name,
                load_if_exists=True, sampler=sampler, **common,
            )  # fmt: skip
        else:
            logger.warning(f"Optuna study {tune_args.study_name!r} already has {before} finished trials: no search.")
        study = optuna.load_study(study_name=tune_args.study_name, storage=storage)
        best = pick_best(study.trials, tune_args.direction, validation_items, n_folds, fold_repeats)
        record.update(
            storage=tune_args.storage or "sqlite:///" + os.path.join(training_args.output_dir, "study.db"),
            study_name=tune_args.study_name,
            trials_before=before,
            trials_run=remaining,
            trials=[_trial_record(t) for t in study.trials],
            best_trial=best.number,
            best_value=best.value,
            best_hyperparameters=best.params,
        )
    else:
        import ray

        if not ray.is_initialized():
            ray.init(address=tune_args.address, include_dashboard=False)
        resources = {"cpu": tune_args.num_cpus_per_trial}
        if tune_args.num_gpus_per_trial:
            resources["gpu"] = tune_args.num_gpus_per_trial
        best_run = make_trainer().hyperparameter_search(
            backend="ray", n_trials=tune_args.n_trials, resources_per_trial=resources,
            storage_path=os.path.abspath(os.path.join(training_args.output_dir, "ray")), name=tune_args.study_name,
            resume="AUTO", **common,
        )  # fmt: skip
        analysis = best_run.run_summary
        trials = [
            {
                "number": t.trial_id,
                "state": t.status,
                "value": (t.last_result or {}).get("objective"),
                "params": dict(t.config),
                "metrics": {k: v for k, v in (t.last_result or {}).items() if k.startswith("eval_")},
            }
            for t in analysis.trials
        ]
        if folds:  # the score on each fold, reported beside the mean
            for trial in trials:
                trial["fold_scores"] = [trial["metrics"].get(f"{key}_fold{i}") for i in range(len(folds))]
        record.update(
            address=tune_args.address,
            study_name=tune_args.study_name,
            trials=trials,
            best_trial=best_run.run_id,
            best_value=best_run.objective,
            best_hyperparameters={k: v for k, v in best_run.hyperparameters.items() if isinstance(v, (int, float, str))},
        )
    record["best_settings"] = space.settings(record["best_hyperparameters"])
    return record


# ---- retraining and the paired comparison --------------------------------------------------------


def signed_rank_p(differences) -> float:
    """Two-sided Wilcoxon signed-rank p (scipy's default: zero differences dropped); nan when every pair ties."""
    from scipy.stats import wilcoxon

    differences = np.asarray(differences, dtype=float)
    return float(wilcoxon(differences).pvalue) if (differences != 0).any() else float("nan")


def paired_comparison(plain: list[float], best: list[float]) -> dict:
    """best - plain, paired by seed: mean, wins/ties/losses and the Wilcoxon signed-rank p."""
    plain, best = np.asarray(plain, dtype=float), np.asarray(best, dtype=float)
    diff = best - plain
    return {
        "pairs": int(len(diff)),
        "plain_mean": float(plain.mean()),
        "best_mean": float(best.mean()),
        "mean_difference": float(diff.mean()),
        "std_difference": float(diff.std(ddof=1)) if len(diff) > 1 else float("nan"),
        "wins": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "losses": int((diff < 0).sum()),
        "p_value": signed_rank_p(diff),
    }


# training arguments that do not change what a run computes (left out of its fingerprint)
_NOT_IN_FINGERPRINT = (
    "output_dir", "logging_dir", "run_name", "disable_tqdm", "report_to", "logging_steps", "logging_strategy",
    "logging_first_step", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "save_strategy", "save_steps", "save_total_limit", "resume_from_checkpoint", "overwrite_output_dir",
)


def fingerprint(model_args: ModelArguments, data_args: DataArguments, training_args: DREGTrainingArguments) -> str:
    """A short hash of everything that defines the runs but the regularizer and its strength."""
    import hashlib

    training = {k: v for k, v in training_args.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    for key in ("regularizer", "dreg_lambda", "reg_lambda"):  # set by the search and by each final run (reg_lambda: deprecated, None)
        training.pop(key, None)
    blob = json.dumps([dataclasses.asdict(model_args), dataclasses.asdict(data_args), training], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def pair_runs(runs: list[dict], seeds: list[int], metric: str) -> list[dict]:
    """``[{"seed", "plain", "best"}]``: the test ``metric`` of the plain and the best run of each seed."""
    by_seed = {(run["seed"], run["setting"]): run["metrics"][f"test_{metric}"] for run in runs}
    missing = [(seed, name) for seed in seeds for name in ("plain", "best") if (seed, name) not in by_seed]
    if missing:
        raise ValueError(f"No finished run for {missing}.")
    return [{"seed": seed, "plain": by_seed[(seed, "plain")], "best": by_seed[(seed, "best")]} for seed in seeds]


def _run_key(name: str, seed: int, settings: dict, config: str) -> str:
    return f"{name}|seed={seed}|{json.dumps(settings, sort_keys=True)}|config={config}"


def retrain(
    featurizer: Featurizer,
    train: Dataset,
    test: Dataset,
    training_args: DREGTrainingArguments,
    seeds: list[int],
    settings: dict,
    data_args: DataArguments,
    config: str = "",
    trainer_class: type = DREGTrainer,
    progress: bool = True,
) -> list[dict]:
    """Train every setting of ``settings`` (name -> DREGConfig fields) with every seed on ``train``, evaluate
    on ``test``; finished runs are appended to ``runs.jsonl`` and skipped when run again with the same ``config``
    (a :func:`fingerprint` of the other arguments)."""
    runs_path = Path(training_args.output_dir) / RUNS_FILE
    finished = {record["run"]: record for record in read_results(runs_path)}
    todo = [(seed, name) for seed in seeds for name in settings]
    records = {}
    train_features = test_features = noisy_features = None
    bar = tqdm(total=len(todo), desc="retrain (best vs plain)", unit="run", disable=not progress)
    try:
        for seed, name in todo:
            key = _run_key(name, seed, settings[name], config)
            if key in finished:
                records[key] = finished[key]
                bar.update(1)
                continue
            if train_features is None:
                train_features, test_features = featurizer.features(train), featurizer.features(test)
                if data_args.eval_noise > 0:
                    noisy_features = featurizer.features(test, data_args.eval_noise, seed=0)
            bar.set_postfix_str(f"{name} seed {seed}")
            start = time.perf_counter()
            args = derive_args(
                training_args, settings[name], seed=seed, output_dir=os.path.join(training_args.output_dir, "runs", f"{name}-seed{seed}"),
                eval_strategy="no", save_strategy="no", load_best_model_at_end=False, push_to_hub=False,
            )  # fmt: skip
            tf.set_seed(seed)
            trainer = trainer_class(
                model=featurizer.model_init(), args=args, train_dataset=train_features, processing_class=featurizer.processor,
                data_collator=featurizer.collator, compute_metrics=ClassificationMetrics(),
            )  # fmt: skip
            train_metrics = trainer.train().metrics
            metrics = trainer.evaluate(test_features, metric_key_prefix="test")
            if noisy_features is not None:
                metrics.update(trainer.evaluate(noisy_features, metric_key_prefix="test_noisy"))
            record = {
                "run": key,
                "config": config,
                "setting": name,
                "seed": seed,
                "settings": settings[name],
                "reg_lambda": args.strength,  # the lambda used (calibrated under 'auto')
                "weight_decay": args.weight_decay,
                "metrics": metrics,
                "train_metrics": train_metrics,
                "train_examples": len(train),
                "test_examples": len(test),
                "wall_time_s": round(time.perf_counter() - start, 2),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            append_result(runs_path, record)
            records[key] = record
            bar.update(1)
    finally:
        bar.close()
    return [records[_run_key(name, seed, settings[name], config)] for seed, name in todo]


# ---- the report ----------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.2f}" if value is not None and math.isfinite(value) else "nan"


def _describe(settings: dict) -> str:
    if settings["regularizer"] == "dreg":
        return f"dreg, dreg_lambda={settings['dreg_lambda']:.4g}"
    if settings["regularizer"] == "none":
        return "none"
    return f"{settings['regularizer']}, dreg_lambda={settings['dreg_lambda']:.4g}"


def _sizes(sizes: list[int]) -> str:
    low, high = min(sizes), max(sizes)
    return str(low) if low == high else f"{low}-{high}"


def write_report(results: dict, folder: str | Path) -> Path:
    """``TUNE_REPORT.md`` and the paired plot in ``folder``; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metric = results["metric"]
    per_seed = results["per_seed"]
    comparison = results["comparison"]
    search = results["search"]
    best = _describe(search["best_settings"])
    plot = plot_paired(per_seed, metric, folder / f"paired_{metric}.png", best)
    unit = "" if metric == "loss" else " (%)"
    show = (lambda v: f"{v:.4f}") if metric == "loss" else _pct
    show_diff = (lambda v: f"{v:+.4f}") if metric == "loss" else (lambda v: f"{100 * v:+.2f}")
    folds = search.get("folds", 1)
    if folds == 1:
        validation = (
            f"Search: {search['backend']}, {len(search['trials'])} trials on a stratified validation split carved from the "
            f"training data ({results['data']['search_validation_examples']} of {results['data']['train_examples']} examples); "
        )
    else:
        repeats = search.get("fold_repeats", 1)
        validation = (
            f"Search: {search['backend']}, {len(search['trials'])} trials, each scored by stratified {folds}-fold "
            f"cross-validation{f' repeated {repeats} times' if repeats > 1 else ''} of the {results['data']['train_examples']} "
            f"training examples (trained on {folds - 1} folds, scored on the held-out one, for every fold): each trial was scored "
            f"on {search['validation_items']} validation items ({_sizes(search['fold_validation_items'])} per fold), its score "
            f"the mean over the folds; "
        )
    lines = [
        "# Tuned regularizer against plain fine-tuning",
        "",
        validation + f"the test set ({results['data']['test_examples']} examples) was not used in the search.",
        f"Best setting: **{best}** (validation {search['metric']} {search['best_value']:.4g}"
        + (f", mean of {folds * search.get('fold_repeats', 1)} folds" if folds > 1 else "") + f", trial {search['best_trial']}).",
        f"Plain: dreg_lambda = 0. Both retrained on all {results['data']['train_examples']} training examples with each seed, "
        f"scored on the test set.",
        "",
        f"| seed | plain test {metric}{unit} | best test {metric}{unit} | best - plain |",
        "| --- | --- | --- | --- |",
    ]
    for row in per_seed:
        diff = row["best"] - row["plain"]
        lines.append(f"| {row['seed']} | {show(row['plain'])} | {show(row['best'])} | {show_diff(diff)} |")
    lines.append(
        f"| mean | {show(comparison['plain_mean'])} | {show(comparison['best_mean'])} | {show_diff(comparison['mean_difference'])} |"
    )
    p = comparison["p_value"]
    lines += [
        "",
        f"Paired Wilcoxon signed-rank test (two-sided, scipy; tied pairs dropped): {comparison['pairs']} pairs, "
        f"{comparison['wins']} wins / {comparison['ties']} ties / {comparison['losses']} losses of the best setting, "
        f"p = {p:.4g}" + (" (every pair tied: no test)" if not math.isfinite(p) else "") + ".",
        "",
        f"![{plot.name}]({plot.name})",
        "",
    ]
    if folds > 1:
        lines += [f"Validation {search['metric']} of each trial on each fold:", "",
                  "| trial | setting | " + " | ".join(f"fold {i}" for i in range(len(search["fold_validation_items"]))) + " | mean |",
                  "| --- | --- | " + "--- | " * len(search["fold_validation_items"]) + "--- |"]  # fmt: skip
        for trial in search["trials"]:
            scores = list(trial.get("fold_scores") or [])
            scores += [None] * (len(search["fold_validation_items"]) - len(scores))  # a failed trial: none
            value = trial.get("value")
            lines.append(
                f"| {trial['number']} | {_params(trial['params'])} | "
                + " | ".join("-" if v is None else f"{v:.4g}" for v in scores)
                + f" | {'-' if value is None else f'{value:.4g}'} |"
            )
        lines.append("")
    lines += [f"Every run: `{RESULTS_FILE}` (and `{RUNS_FILE}`).", ""]
    path = folder / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def plot_paired(per_seed: list[dict], metric: str, path: Path, best_label: str) -> Path:
    """The test metric of plain and best for each seed, joined by a line per seed; the means in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1.0 if metric == "loss" else 100.0
    fig, ax = plt.subplots(figsize=(5, 4))
    for row in per_seed:
        ax.plot([0, 1], [scale * row["plain"], scale * row["best"]], "o-", color="tab:blue", alpha=0.6)
        ax.annotate(f"seed {row['seed']}", (1, scale * row["best"]), xytext=(6, 0), textcoords="offset points", fontsize=7, va="center")
    means = [scale * np.mean([r["plain"] for r in per_seed]), scale * np.mean([r["best"] for r in per_seed])]
    ax.plot([0, 1], means, "D-", color="black", label="mean", linewidth=2)
    ax.set_xticks([0, 1], ["plain (lambda 0)", best_label], fontsize=8)
    ax.set_xlim(-0.3, 1.5)
    ax.set_ylabel(f"test {metric}" + ("" if metric == "loss" else " (%)"))
    ax.set_title("Paired by seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the whole run -------------------------------------------------------------------------------


def check_dependencies(backend: str) -> None:
    """The optional packages the whole run needs, checked before it starts (not after an hour of training)."""
    import importlib.util

    needed = {"scipy": "tune", "matplotlib": "tune", "sklearn": "tune (scikit-learn)"}
    needed["optuna" if backend == "optuna" else "ray"] = "tune" if backend == "optuna" else "ray"
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        extras = sorted({needed[name].split(" ")[0] for name in missing})
        raise ImportError(
            f"Tuning needs {', '.join(missing)}, not installed here: pip install 'hf_dreg[{','.join(extras)}]'. "
            "Nothing was trained."
        )


def run_tune(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DREGTrainingArguments,
    tune_args: TuneArguments,
    progress: bool = True,
) -> dict:
    """Search on a validation split of the training data, retrain best and plain over the seeds, compare on the test set."""
    check_dependencies(tune_args.backend)  # before any training: the plot and the test come at the end
    os.makedirs(training_args.output_dir, exist_ok=True)
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    splits, regime = prepare_splits(data_args, data_seed)
    train, test = splits["train"], splits["validation"]  # the user's evaluation split is the test set
    labels = train[data_args.label_column]
    n_folds = tune_args.folds_for(labels)
    folds = None
    if n_folds == 1:
        search_train, search_validation = stratified_split(train, tune_args.validation_fraction, data_args.label_column, data_seed)
        if tune_args.search_folds != "auto" and dataclasses.replace(tune_args, search_folds="auto").folds_for(labels) > 1:
            logger.warning(
                f"hf_dreg tune: --search_folds 1 scores each trial on {len(search_validation)} validation items of the "
                f"{len(train)} training examples; --search_folds auto would score it on all {len(train)} (k-fold)."
            )
    else:
        folds = stratified_folds(labels, n_folds, tune_args.search_fold_repeats, data_seed)
        search_train, search_validation = train, None
        logger.warning(
            f"hf_dreg tune: {len(train)} training examples: each trial is scored by stratified {n_folds}-fold cross-validation"
            + (f" repeated {tune_args.search_fold_repeats} times" if tune_args.search_fold_repeats > 1 else "")
            + f" ({len(folds)} trainings per trial, on {len(train) * tune_args.search_fold_repeats} validation items in all)."
        )
    featurizer = Featurizer(model_args, data_args, train)

    config = fingerprint(model_args, data_args, training_args)
    search_record = search(
        featurizer, search_train, search_validation, training_args, tune_args, config=config, folds=folds,
        fold_repeats=tune_args.search_fold_repeats,
    )  # fmt: skip
    settings = {"plain": dict(PLAIN), "best": search_record["best_settings"]}
    runs = retrain(featurizer, train, test, training_args, tune_args.seeds, settings, data_args, config, progress=progress)

    per_seed = pair_runs(runs, tune_args.seeds, tune_args.search_metric)
    comparison = paired_comparison([r["plain"] for r in per_seed], [r["best"] for r in per_seed])
    results = {
        "metric": tune_args.search_metric,
        "search": search_record,
        "settings": settings,
        "per_seed": per_seed,
        "comparison": comparison,
        "runs": runs,
        "data": {
            **regime,
            "data_seed": data_seed,
            "validation_fraction": tune_args.validation_fraction,
            "search_folds": n_folds,
            **(
                {"search_train_examples": len(search_train), "search_validation_examples": len(search_validation)}
                if folds is None else {
                    "search_fold_repeats": tune_args.search_fold_repeats,
                    "search_examples": len(train),  # cross-validated: each trained on k-1 folds, scored on the other
                    "search_fold_train_examples": search_record["fold_train_items"],
                    "search_validation_examples": search_record["validation_items"],  # all folds together, per trial
                }
            ),
            "test_examples": len(test),
        },
        "model": model_args.model_name_or_path or f"{model_args.model_type} from scratch",
        "config": config,
        "versions": versions(),
    }
    with open(os.path.join(training_args.output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2, default=str)
    results["report"] = str(write_report(results, training_args.output_dir))
    return results


def parse_tune_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, DREGTrainingArguments, TuneArguments) from flags or one .yaml/.json file."""
    return parse_arguments((*CLASSIFICATION_ARGUMENTS, TuneArguments), argv)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args, tune_args = parse_tune_args(argv)
    results = run_tune(model_args, data_args, training_args, tune_args)
    print(Path(results["report"]).read_text(encoding="utf-8"))
    return results
