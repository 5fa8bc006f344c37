"""Document functions of clora_ds's local-file lm-eval tasks (copied beside the rendered YAMLs; lm-eval loads it)."""
from clora_ds.evaluation.choice import choice_request
from clora_ds.evaluation.protocols import protocol_for

LETTERS = "ABCDEFGHIJKLMNOP"


def _request(doc):
    return choice_request(doc, protocol_for([doc], "lm-eval document"))


def mc_context(doc):
    return _request(doc)[0]


def mc_choices(doc):
    return _request(doc)[1]


def mc_target(doc):
    return _request(doc)[2]


def mmlu_pro_text(doc):
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(doc["options"]))
    return f"Question: {doc['question']}\nOptions:\n{options}\nAnswer:"


def mmlu_pro_choices(doc):
    return [f" {LETTERS[i]}" for i in range(len(doc["options"]))]
