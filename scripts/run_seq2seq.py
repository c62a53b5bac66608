#!/usr/bin/env python
"""Fine-tune an encoder-decoder (T5, BART...) with DREG (``hf_dreg.with_dreg(Seq2SeqTrainer)``).

    python scripts/run_seq2seq.py --model_name_or_path google-t5/t5-small --train_file train.jsonl \
        --validation_file valid.jsonl --source_prefix "summarize: " --predict_with_generate --output_dir out
    python scripts/run_seq2seq.py configs/seq2seq_t5.yaml      # or one YAML/JSON file

Every flag of Seq2SeqModelArguments, Seq2SeqDataArguments (hf_dreg.recipes.seq2seq), Seq2SeqTrainingArguments and
hf_dreg.DREGConfig is accepted (--help lists them). Data: {"source", "target"} JSONL (--source_column,
--target_column), or a hub dataset. With --predict_with_generate the evaluation reports chrF, ROUGE-L and
exact match (packaged metrics, offline) beside eval_loss and eval_dreg.
"""

from hf_dreg.recipes.seq2seq import main

if __name__ == "__main__":
    main()
