"""Accuracy: the fraction of predictions equal to their reference (uncurl-hf's offline metric module)."""

import datasets
import evaluate

_DESCRIPTION = "Accuracy = (number of predictions equal to the reference) / (number of examples)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str or int): predicted labels.
    references (list of str or int): gold labels, same length.
Returns:
    accuracy (float): in [0, 1].
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError("predictions and references differ in length")
        if not references:
            return {"accuracy": 0.0}
        correct = sum(str(p) == str(r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references)}
