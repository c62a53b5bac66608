#!/usr/bin/env python
"""Tune the regularizer on your data and compare it with plain fine-tuning over several seeds.

    python scripts/tune.py configs/tune_minilm_sst2.yaml
    python scripts/tune.py --model_name_or_path packaged-minilm --data_dir ../shared/data/sst2 --samples_per_class 32 \\
        --n_trials 20 --seeds 0 1 2 3 4 --output_dir outputs/tune-sst2 [--backend ray --address auto]

Scores the trials on the training data only (a stratified validation split, or stratified k-fold
cross-validation for small training sets: --search_folds), searches with Trainer.hyperparameter_search
(Optuna with SQLite storage by default: a killed search resumes), retrains the best setting and plain
fine-tuning with each seed and reports the paired difference on the test set (Wilcoxon signed-rank test,
Markdown table, plot, JSON of every run). See hf_dreg/recipes/tune.py and docs/tuning.md.
"""

from hf_dreg.recipes.tune import main

if __name__ == "__main__":
    main()
