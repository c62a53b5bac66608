"""A typo in a config file or on the command line names the closest valid setting, in every script."""

from __future__ import annotations

import pytest

from hf_dreg.recipes.arguments import parse_finetuning_args


def _parsers():
    from hf_dreg.recipes.seq2seq import parse_seq2seq_args
    from hf_dreg.recipes.tune import parse_tune_args

    parsers = {"classification": parse_finetuning_args, "seq2seq": parse_seq2seq_args, "tune": parse_tune_args}
    try:
        from hf_dreg.recipes.sft import parse_sft_args

        parsers["sft"] = parse_sft_args
    except ImportError:  # TRL not installed
        pass
    return parsers


@pytest.mark.parametrize("script", ["classification", "seq2seq", "tune", "sft"])
def test_a_config_typo_names_the_closest_key(script, tmp_path):
    parsers = _parsers()
    if script not in parsers:
        pytest.skip("TRL is not installed")
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\ndreg_lamda: 0.01\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) dreg_lamda \(did you mean dreg_lambda\?\)"):
        parsers[script]([str(config)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["classification", "seq2seq", "tune", "sft"])
def test_a_flag_typo_names_the_closest_flag(script, tmp_path, capsys):
    parsers = _parsers()
    if script not in parsers:
        pytest.skip("TRL is not installed")
    with pytest.raises(SystemExit, match=r"unknown flag\(s\) --dreg_lamda \(did you mean --dreg_lambda\?\)"):
        parsers[script](["--output_dir", str(tmp_path / "out"), "--dreg_lamda", "0.01"])


def test_known_flags_and_aliases_still_parse(tmp_path):
    model_args, data_args, training_args = parse_finetuning_args(
        ["--model_type", "bert", "--output_dir", str(tmp_path), "--dreg_lambda", "0.01", "--dataset_config_name", "x", "--use_cpu"])
    assert training_args.dreg_lambda == 0.01 and data_args.dataset_config_name == "x"
