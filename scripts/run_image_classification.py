#!/usr/bin/env python
"""Fine-tune a image classifier with DREG (or another regularizer of the study).

    python scripts/run_image_classification.py --model_name_or_path ... --train_file ... --output_dir ...
    python scripts/run_image_classification.py configs/CONFIG.yaml

Every flag of ModelArguments, DataArguments and DREGTrainingArguments is accepted (--help lists them).
"""

from hf_dreg.recipes.arguments import parse_finetuning_args
from hf_dreg.recipes.classification import run_classification


def main():
    model_args, data_args, training_args = parse_finetuning_args()
    run_classification(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
