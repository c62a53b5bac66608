# Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# An implementation of chrF / chrF++ written for hf_dreg from the published definitions
# (Popovic 2015, WMT; Popovic 2017, WMT), with the corpus-level statistics and defaults of sacreBLEU
# (Post 2018), so that scores are comparable with it; its interface (inputs, arguments, output keys)
# follows the Hugging Face `evaluate-metric/chrf` module. Shipped inside hf_dreg so that it loads
# offline: `evaluate.load("<path to this folder>")`.
"""chrF and chrF++: F-score of character (and word) n-gram precision and recall."""

import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = """
chrF (Popovic 2015) compares a hypothesis with a reference by their character n-grams, n = 1..6
(whitespace removed). For each order n, precision P_n = matched n-grams / hypothesis n-grams and
recall R_n = matched n-grams / reference n-grams (matches clipped by the reference counts). P and R
are averaged over the orders that occur in both hypothesis and reference, and

    chrF = 100 * (1 + beta^2) * P * R / (beta^2 * P + R),    beta = 2 (recall weighs twice).

chrF++ (Popovic 2017) adds word n-grams, n = 1..word_order (word_order=2), to the orders
averaged; words are split on whitespace with a leading or trailing punctuation mark split off.
Corpus level (as sacreBLEU): the n-gram counts are summed over the sentences before P and R are
computed; where a sentence's reference has no n-grams of order n (it is shorter than n), the
hypothesis's n-grams of that order are not counted either. With several references, each sentence uses the reference with the best sentence score.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the hypotheses.
    references (`list` of `str`, or `list` of `list` of `str`): one reference, or several, per hypothesis.
    char_order (`int`): the largest character n-gram order. Default 6.
    word_order (`int`): the largest word n-gram order (0 = chrF, 2 = chrF++). Default 0.
    beta (`int`): recall is weighted beta times as much as precision. Default 2.
    lowercase (`bool`): compare lowercased text. Default False.
    whitespace (`bool`): keep whitespace in the character n-grams. Default False.

Returns:
    score (`float`): the corpus chrF (chrF++ with word_order=2), between 0 and 100; higher is better.
    char_order, word_order, beta: the settings used.

Example:
    >>> chrf = evaluate.load("hf_dreg/metrics/chrf")
    >>> chrf.compute(predictions=["the cat sat"], references=[["the cat sat"]])["score"]
    100.0
"""

_CITATION = """
@inproceedings{popovic-2015-chrf,
  title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
  author = "Popovi{\\'c}, Maja",
  booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
  year = "2015",
  pages = "392--395",
}
@inproceedings{popovic-2017-chrf,
  title = "chr{F}++: words helping character n-grams",
  author = "Popovi{\\'c}, Maja",
  booktitle = "Proceedings of the Second Conference on Machine Translation",
  year = "2017",
  pages = "612--618",
}
@inproceedings{post-2018-call,
  title = "A Call for Clarity in Reporting {BLEU} Scores",
  author = "Post, Matt",
  booktitle = "Proceedings of the Third Conference on Machine Translation",
  year = "2018",
  pages = "186--191",
}
"""

_PUNCTUATION = set(string.punctuation)


def _words(text):
    """Whitespace tokens, with one leading or trailing punctuation mark split off ("cat." -> "cat", ".")."""
    words = []
    for token in text.split():
        if len(token) > 1 and token[-1] in _PUNCTUATION:
            words += [token[:-1], token[-1]]
        elif len(token) > 1 and token[0] in _PUNCTUATION:
            words += [token[0], token[1:]]
        else:
            words.append(token)
    return words


def _ngrams(units, n):
    return Counter(tuple(units[i : i + n]) for i in range(len(units) - n + 1))


def _sentence_stats(hypothesis, reference, char_order, word_order, lowercase, whitespace):
    """Per order (characters 1..char_order, then words 1..word_order): [hypothesis n-grams, reference n-grams, matches]."""
    if lowercase:
        hypothesis, reference = hypothesis.lower(), reference.lower()
    stats = []
    hyp_chars = hypothesis if whitespace else "".join(hypothesis.split())
    ref_chars = reference if whitespace else "".join(reference.split())
    units = [(hyp_chars, ref_chars, n) for n in range(1, char_order + 1)]
    units += [(_words(hypothesis), _words(reference), n) for n in range(1, word_order + 1)]
    for hyp_units, ref_units, n in units:
        hyp, ref = _ngrams(list(hyp_units), n), _ngrams(list(ref_units), n)
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items())
        # a reference shorter than n says nothing about order n: the hypothesis's n-grams are not counted
        stats.append([sum(hyp.values()) if ref else 0, sum(ref.values()), matches])
    return stats


def _f_score(stats, beta):
    """chrF of summed statistics: P and R averaged over the orders present in both, then F-beta (x 100)."""
    precisions = [m / h for h, r, m in stats if h > 0 and r > 0]
    recalls = [m / r for h, r, m in stats if h > 0 and r > 0]
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    b2 = beta**2
    return 100 * (1 + b2) * p * r / (b2 * p + r)


def corpus_chrf(predictions, references, char_order=6, word_order=0, beta=2, lowercase=False, whitespace=False):
    """The corpus chrF (references: one string or a list of strings per prediction)."""
    total = None
    for hypothesis, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        candidates = [_sentence_stats(hypothesis, ref, char_order, word_order, lowercase, whitespace) for ref in refs]
        best = max(candidates, key=lambda s: _f_score(s, beta))  # the first of equals
        total = best if total is None else [[a + b for a, b in zip(t, s)] for t, s in zip(total, best)]
    return _f_score(total, beta) if total is not None else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://aclanthology.org/W15-3049", "https://aclanthology.org/W17-4770"],
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False, whitespace=False):
        score = corpus_chrf(predictions, references, char_order, word_order, beta, lowercase, whitespace)
        return {"score": score, "char_order": char_order, "word_order": word_order, "beta": beta}
