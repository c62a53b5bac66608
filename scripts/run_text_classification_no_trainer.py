#!/usr/bin/env python
"""Fine-tune a text classifier with DREG in your own accelerate loop (no Trainer).

    python scripts/run_text_classification_no_trainer.py --model_name_or_path packaged-minilm \
        --train_file train.jsonl --validation_file test.jsonl --output_dir out --gradient_accumulation_steps 2
    accelerate launch --num_processes 2 scripts/run_text_classification_no_trainer.py ...

DREG is exact under accumulation and DDP (hf_dreg.count_positions + handle.penalty(num_positions=...));
--help lists the flags.
"""

from hf_dreg.recipes.classification_no_trainer import main

if __name__ == "__main__":
    main()
