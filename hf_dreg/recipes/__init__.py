"""The recipes: what ``scripts/`` call, built on the library like any user's code.

:mod:`.arguments` (the one argument parser of the scripts), :mod:`.data` (the one data layer: files, hub
data sets, few-shot subsets, noise), :mod:`.models` (model, tokenizer and image processor from flags),
:mod:`.classification` (text and image classification), :mod:`.sft` (TRL's SFTTrainer), :mod:`.seq2seq`,
:mod:`.tune` (does DREG help on my data?), and their helpers (:mod:`.train_and_save`, :mod:`.results_store`,
:mod:`.provenance`).
"""
