# Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# Its interface (inputs, arguments, output key) follows the Hugging Face `evaluate-metric/f1`
# module (Copyright 2020 The HuggingFace Datasets Authors, Apache-2.0); the computation is
# scikit-learn's `f1_score`. Shipped inside hf_dreg so that it loads offline:
# `evaluate.load("<path to this folder>")`.
"""F1: the harmonic mean of precision and recall."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall:
    F1 = 2 * (precision * recall) / (precision + recall)
With average="macro" it is the unweighted mean of the per-class F1 scores (macro-F1).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    labels (`list` of `int`): the labels to include (and their order when `average=None`); default: all
        labels present in predictions and references, sorted.
    pos_label (`int`): the positive class when `average="binary"`. Default 1.
    average (`str` or `None`): "binary" (default), "micro", "macro", "weighted", "samples" (multilabel),
        or None for one score per class.
    sample_weight (`list` of `float`): optional per-example weights.

Returns:
    f1 (`float`, or an array of `float` when `average=None`): between 0 and 1; higher is better.

Example:
    >>> f1 = evaluate.load("hf_dreg/metrics/f1")
    >>> f1.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 2, 1, 0, 0, 1], average="macro")["f1"]
    0.26666666666666666
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O.
          and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A.
          and Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        value = datasets.Value("int32")
        multilabel = self.config_name == "multilabel"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(value) if multilabel else value,
                    "references": datasets.Sequence(value) if multilabel else value,
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        score = f1_score(
            references, predictions, labels=labels, pos_label=pos_label, average=average, sample_weight=sample_weight
        )
        return {"f1": float(score) if np.ndim(score) == 0 else np.asarray(score)}
