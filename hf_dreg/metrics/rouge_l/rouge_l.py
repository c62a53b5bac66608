# Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# An implementation of ROUGE-L written for hf_dreg from the published definition (Lin 2004, section
# 3.1: sentence-level LCS-based F-measure), with the default tokenization of Google's `rouge_score`
# package (lowercase, runs of characters other than a-z and 0-9 are separators, no stemming) so
# that scores are comparable with it; the output keys follow the Hugging Face `evaluate-metric/rouge`
# module. Shipped inside hf_dreg so that it loads offline: `evaluate.load("<path to this folder>")`.
"""ROUGE-L: the longest common subsequence of prediction and reference, as an F-measure."""

import re

import datasets
import evaluate

_DESCRIPTION = """
ROUGE-L (Lin 2004) scores a prediction against a reference by their longest common subsequence
(LCS) of tokens: precision P = LCS / prediction length, recall R = LCS / reference length, and
F = 2 P R / (P + R) (0 when either is empty or nothing matches). The reported scores are the means
over the examples. Tokens: the text lowercased, every run of characters other than a-z and 0-9
replaced by a space, split on whitespace (rouge_score's default tokenizer, without stemming; text
in other scripts has no tokens). With several references an example takes the best F.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the predictions.
    references (`list` of `str`, or `list` of `list` of `str`): one reference, or several, per prediction.

Returns:
    rougeL (`float`): the mean ROUGE-L F-measure, between 0 and 1; higher is better.
    rougeL_precision, rougeL_recall (`float`): the mean precision and recall (of the best reference).

Example:
    >>> rouge_l = evaluate.load("hf_dreg/metrics/rouge_l")
    >>> rouge_l.compute(predictions=["the cat sat on the mat"], references=["the cat was on the mat"])["rougeL"]
    0.8333333333333334
"""

_CITATION = """
@inproceedings{lin-2004-rouge,
  title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
  author = "Lin, Chin-Yew",
  booktitle = "Text Summarization Branches Out",
  year = "2004",
  pages = "74--81",
}
"""

_SEPARATORS = re.compile(r"[^a-z0-9]+")


def tokenize(text):
    return _SEPARATORS.sub(" ", text.lower()).split()


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (dynamic programming, one row)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction, reference):
    """(precision, recall, F) of one prediction against one reference."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    lcs = lcs_length(pred, ref)
    precision, recall = lcs / len(pred), lcs / len(ref)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://aclanthology.org/W04-1013", "https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references):
        scores = []
        for prediction, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else list(refs)
            scores.append(max((rouge_l(prediction, ref) for ref in refs), key=lambda s: s[2]))
        n = max(len(scores), 1)
        return {
            "rougeL": sum(s[2] for s in scores) / n,
            "rougeL_precision": sum(s[0] for s in scores) / n,
            "rougeL_recall": sum(s[1] for s in scores) / n,
        }
