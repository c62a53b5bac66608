#!/usr/bin/env python
"""Fine-tune a causal LM with DREG in your own accelerate loop (no Trainer).

    python scripts/run_clm_no_trainer.py --model_name_or_path Qwen/Qwen2.5-0.5B --dreg_activations silu \
        --train_file train.jsonl --validation_file test.jsonl --output_dir out --gradient_accumulation_steps 4
    accelerate launch --num_processes 2 scripts/run_clm_no_trainer.py ...

The task loss and DREG are exact under accumulation and DDP on texts of unequal length (num_items_in_batch,
hf_dreg.count_positions + handle.penalty(num_positions=...)); --help lists the flags.
"""

from hf_dreg.recipes.causal_lm_no_trainer import main

if __name__ == "__main__":
    main()
