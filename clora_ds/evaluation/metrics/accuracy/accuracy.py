"""Accuracy as an `evaluate` metric module, shipped inside clora_ds and loaded by path (nothing is fetched):

    evaluate.load(str(Path(clora_ds.evaluation.__file__).parent / "metrics" / "accuracy"))

predictions and references are labels (integers: an index into the task's label set); accuracy is the fraction equal.
"""
import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference."
_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): gold labels.
Returns:
    accuracy (float): fraction of predictions equal to their reference, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if not references:
            return {"accuracy": 0.0}
        return {"accuracy": float(sum(int(p == r) for p, r in zip(predictions, references)) / len(references))}
