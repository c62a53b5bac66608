"""scripts/run_seq2seq.py end to end, in-process (``hf_dreg.recipes.seq2seq.main(argv)``), on tiny random T5
(gated-gelu) and BART checkpoints saved with the fixture tokenizer, on the source/target fixture JSONL; and the
packaged generation metrics.

Compared against: the metrics ``main`` returned (the card's model-index, ``all_results.json``), ``exp(eval_loss)``,
the fixture files, the messages of the errors; chrF against a hand computation and sacreBLEU, ROUGE-L against a
hand computation and Google's rouge_score (both installed by the test extra).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import tiny_lm
from huggingface_hub import ModelCard

from hf_dreg.metrics import load_metric
from hf_dreg.model_card import metric_results
from hf_dreg.recipes.seq2seq import main, parse_seq2seq_args

FIXTURES = tiny_lm.FIXTURES
REPO = FIXTURES.parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: tiny_lm.save_model(root / family, family) for family in ("t5", "bart")}


def _argv(model, out, *extra):
    return [
        "--model_name_or_path", str(model), "--train_file", str(FIXTURES / "seq2seq_train.jsonl"),
        "--validation_file", str(FIXTURES / "seq2seq_validation.jsonl"), "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--logging_steps", "1", "--learning_rate", "1e-2", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--disable_tqdm", "true", "--max_target_length", "8", "--seed", "0",
        "--dreg_lambda", "0.01", "--dreg_kernels", "eager", *extra,
    ]


def _check_run(run, out):
    trainer = run.trainer
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert steps and all({"dreg", "task_loss"} <= set(entry) and entry["dreg"] > 0 for entry in steps)
    metrics = run.eval_metrics
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_loss"] == metrics["eval_loss"]
    assert (out / "model.safetensors").is_file() and (out / "dreg_config.json").is_file()
    card = ModelCard.load(out / "README.md")
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == metric_results(metrics)
    assert {r.task_type for r in card.data.eval_results} == {"text2text-generation"}
    assert {r.dataset_name for r in card.data.eval_results} == {"seq2seq_validation.jsonl"}
    assert {"hf_dreg", "dreg", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.base_model is None
    assert card.text.count("## Regularization (hf_dreg)") == 1
    assert trainer.dreg_sites and all(f"`{site.name}`" in card.text for site in trainer.dreg_sites)
    return card


@pytest.fixture(scope="module")
def t5_generate_run(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("t5") / "out"
    return main(_argv(checkpoints["t5"], out, "--predict_with_generate", "--source_prefix", "summarize: ")), out


def test_t5_with_prefix_and_generation_metrics(t5_generate_run):
    run, out = t5_generate_run
    card = _check_run(run, out)
    metrics = run.eval_metrics
    assert {"eval_loss", "eval_chrf", "eval_rougeL", "eval_exact_match", "eval_gen_len", "perplexity"} <= set(metrics)
    assert 0 <= metrics["eval_chrf"] <= 100 and 0 <= metrics["eval_rougeL"] <= 1 and 0 < metrics["eval_gen_len"] <= 8
    assert {"eval_chrf", "eval_rougeL"} <= {r.metric_name for r in card.data.eval_results}
    trainer = run.trainer
    assert len(trainer.dreg_sites) == 4 and {s.kind for s in trainer.dreg_sites} == {"gated"}  # 2 encoder + 2 decoder GeGLU
    tokenizer = trainer.processing_class
    first_source = json.loads((FIXTURES / "seq2seq_train.jsonl").read_text().splitlines()[0])["source"]
    assert trainer.train_dataset[0]["input_ids"] == tokenizer("summarize: " + first_source)["input_ids"]


def test_t5_generate_evaluation_reports_eval_dreg(t5_generate_run):
    # Seq2SeqTrainer computes this evaluation loss with model(**inputs), outside compute_loss (trainer.py 9c89b58)
    run, out = t5_generate_run
    assert math.isfinite(run.eval_metrics["eval_dreg"]) and run.eval_metrics["eval_dreg"] > 0
    card = ModelCard.load(out / "README.md")
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["eval_dreg"] == run.eval_metrics["eval_dreg"]


def test_bart_with_max_train_samples_and_loss_only_evaluation(checkpoints, tmp_path):
    out = tmp_path / "out"
    run = main(_argv(checkpoints["bart"], out, "--max_train_samples", "8", "--max_eval_samples", "4", "--max_steps", "-1",
                     "--num_train_epochs", "1"))
    _check_run(run, out)
    trainer = run.trainer
    assert len(trainer.train_dataset) == 8 and trainer.state.global_step == 2  # one epoch of 8 at batch 4
    assert len(trainer.eval_dataset) == 4 and trainer.run_info["data"]["train_available"] == 32
    assert math.isfinite(run.eval_metrics["eval_dreg"]) and run.eval_metrics["eval_dreg"] > 0
    assert "eval_chrf" not in run.eval_metrics  # no generation without --predict_with_generate
    assert len(trainer.dreg_sites) == 4 and {s.kind for s in trainer.dreg_sites} == {"plain"}


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--target_column", "summary"], ValueError, r"Column 'summary' not found in the 'training' split.*\['source', 'target'\].*--target_column"),
        (["--source_column", "article"], ValueError, r"Column 'article' not found.*--source_column"),
        (["--validation_file", "missing.jsonl"], FileNotFoundError, r"--validation_file missing\.jsonl: no such file"),
        (["--train_file", str(FIXTURES / "README.md")], ValueError, r"--train_file .*unknown file format '\.md'"),
        (["--max_train_samples", "0"], ValueError, r"--max_train_samples must be >= 1"),
    ],
)
def test_bad_inputs_are_errors_naming_the_flag(checkpoints, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        main(_argv(checkpoints["t5"], tmp_path / "out", *extra))


def test_seq2seq_yaml_config_parses():
    model, data, training, dreg = parse_seq2seq_args([str(REPO / "configs" / "seq2seq_t5.yaml")])
    assert model.model_name_or_path == "google/flan-t5-small" and data.source_prefix == "summarize: "
    assert (data.source_column, data.target_column) == ("article", "highlights") and data.max_train_samples == 2000
    assert training.predict_with_generate and training.generation_max_length == 128
    assert dreg.regularizer == "dreg" and dreg.dreg_lambda == 0.01


# ---- the packaged generation metrics -------------------------------------------------------------------


def test_chrf_by_hand_and_against_sacrebleu():
    chrf = load_metric("chrf")
    # "ab" vs "abc": unigrams P=2/2 R=2/3, bigrams P=1/1 R=1/2; no hypothesis trigram, the reference has no 4- to
    # 6-grams: those orders are left out. P = 1, R = 7/12, chrF = 100 * 5PR / (4P + R) = 100 * 35/55
    assert chrf.compute(predictions=["ab"], references=["abc"])["score"] == pytest.approx(100 * 35 / 55, rel=1e-12)
    assert chrf.compute(predictions=["the cat sat"], references=[["the cat sat"]])["score"] == pytest.approx(100.0)
    assert chrf.compute(predictions=["xyz"], references=["abc"])["score"] == 0.0
    sacrebleu = pytest.importorskip("sacrebleu.metrics", reason="sacrebleu is in the test extra")
    rng = random.Random(0)
    words = "the cat dog sat on a mat . , ! big red house ran ( ) don't It's Über".split()

    def sentence(low):
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, 9)))

    for _ in range(30):
        n = rng.randint(1, 5)
        hyps = [sentence(0) for _ in range(n)]
        refs, refs2 = [sentence(1) for _ in range(n)], [sentence(1) for _ in range(n)]
        for word_order, lowercase in ((0, False), (2, False), (0, True)):
            expected = sacrebleu.CHRF(word_order=word_order, lowercase=lowercase).corpus_score(hyps, [refs, refs2]).score
            got = chrf.compute(predictions=hyps, references=[list(r) for r in zip(refs, refs2)],
                               word_order=word_order, lowercase=lowercase)["score"]
            assert got == pytest.approx(expected, abs=1e-9), (hyps, refs, refs2, word_order, lowercase)


def test_rouge_l_by_hand_and_against_rouge_score():
    rouge_l = load_metric("rouge_l")
    # LCS of "the cat sat on the mat" and "the cat was on the mat" is "the cat on the mat": P = R = F = 5/6
    out = rouge_l.compute(predictions=["the cat sat on the mat"], references=["the cat was on the mat"])
    assert out["rougeL"] == pytest.approx(5 / 6) and out["rougeL_precision"] == pytest.approx(5 / 6)
    # "The Cat!" tokenizes to [the, cat]; against "a cat": LCS 1, P = 1/2, R = 1/2
    assert rouge_l.compute(predictions=["The Cat!"], references=["a cat"])["rougeL"] == pytest.approx(0.5)
    assert rouge_l.compute(predictions=[""], references=["a cat"])["rougeL"] == 0.0
    scoring = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge_score is in the test extra")
    scorer = scoring.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    words = "The the cat dog sat on a mat . , ! big red house ran x-ray 42 don't Über".split()
    predictions = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(200)]
    references = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    expected = [scorer.score(r, p)["rougeL"] for p, r in zip(predictions, references)]
    out = rouge_l.compute(predictions=predictions, references=references)
    assert out["rougeL"] == pytest.approx(sum(s.fmeasure for s in expected) / 200, abs=1e-12)
    assert out["rougeL_recall"] == pytest.approx(sum(s.recall for s in expected) / 200, abs=1e-12)
    # several references: the best F of each example (rouge_score's score_multi)
    multi = [scorer.score_multi([r, p[::-1]], p)["rougeL"].fmeasure for p, r in zip(predictions[:50], references[:50])]
    out = rouge_l.compute(predictions=predictions[:50], references=[[r, p[::-1]] for p, r in zip(predictions[:50], references[:50])])
    assert out["rougeL"] == pytest.approx(sum(multi) / 50, abs=1e-12)
