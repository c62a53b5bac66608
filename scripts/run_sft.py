#!/usr/bin/env python
"""Supervised fine-tuning of a causal LM with DREG, TRL's way (``hf_dreg.with_dreg(SFTTrainer)``).

    python scripts/run_sft.py --model_name_or_path google/gemma-2-2b --train_file data.jsonl \
        --use_peft --lora_r 16 --lora_target_modules all-linear --dreg_lambda 1e-2 --output_dir out
    python scripts/run_sft.py configs/sft_lora.yaml          # one YAML file (or --config FILE plus flags)
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml scripts/run_sft.py configs/sft_lora.yaml

Every flag of hf_dreg.recipes.data.DatasetArguments, trl.SFTConfig, trl.ModelConfig and hf_dreg.DREGConfig
is accepted (--help lists them). Data: {"text"}, {"prompt", "completion"} or {"messages"} JSONL, or a hub dataset.
"""

from hf_dreg.recipes.sft import main

if __name__ == "__main__":
    main()
