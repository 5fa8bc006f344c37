"""Multiple-choice accuracy by log-likelihood: each answer label's continuation is scored, the best one is the
prediction. No generation, so it is cheap and runs under ZeRO-3 (every rank in lockstep): this is the accuracy the
launcher logs during training, and the `clora_mc` lm-eval tasks ask exactly the same questions (their YAMLs call
``choice_request``), so lm-eval's `acc` and this agree on the same model.

For a commonsense record (LLM-Adapters layout) the context is the training prompt and the continuations are its
`output` with the gold label replaced by each label the record offers ("the correct answer is option1" /
"... option2"), so the scored text is what the model was trained to write. For a choice record ({input, choices,
label}: BIG-bench's layout, prepare_assets' bbh files) the context is "Q: {input}\nA:" and the continuations are
" " + each option, exactly lm-eval's clora_bbh_mc requests, so the launcher's eval_SET_accuracy is clora_bbh_mc's acc.
The options of one record share their context: continuation_logprobs scores them in one row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .generation import continuation_logprobs
from .protocols import Commonsense, Protocol, candidate_answers


CHOICE = "choice"  # the protocol of choice-format records (clora_ds.data's `choice` format)


def choice_request(record: dict, protocol) -> Tuple[str, List[str], int]:
    """(context, continuations, index of the gold one) for one commonsense record, or a choice record when
    ``protocol`` is CHOICE."""
    if protocol == CHOICE:
        from ..data import choice_context

        return choice_context(record), [" " + c for c in record["choices"]], int(record["label"])
    labels = candidate_answers(record, protocol)
    gold = str(record["answer"]).strip()
    output = str(record.get("output") or gold)
    template = output if gold in output else gold
    return protocol.prompt(record), [template.replace(gold, label) for label in labels], labels.index(gold)


@dataclass
class ChoiceResult:
    accuracy: float
    n: int
    predicted: List[int]   # index of the best-scored continuation, per record
    gold: List[int]


def multiple_choice_accuracy(model, tokenizer, records: Sequence[dict], protocol, batch_size: int = 16,
                             device: Optional[torch.device] = None) -> ChoiceResult:
    """Accuracy of picking the gold continuation by summed log-probability (ties: the first option); sharded over
    ranks, same on every rank. ``protocol``: a Commonsense protocol, or CHOICE for choice records."""
    if protocol != CHOICE and not isinstance(protocol, Commonsense):
        raise ValueError("multiple-choice accuracy needs a commonsense-format or choice-format task")
    requests = [choice_request(r, protocol) for r in records]
    pairs = [(context, c) for context, conts, _ in requests for c in conts]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size, device)
    predicted, at = [], 0
    for _, conts, _ in requests:
        mine = scores[at:at + len(conts)]
        predicted.append(max(range(len(conts)), key=lambda j: (mine[j], -j)))
        at += len(conts)
    gold = [g for _, _, g in requests]
    correct = sum(p == g for p, g in zip(predicted, gold))
    return ChoiceResult(correct / max(len(gold), 1), len(gold), predicted, gold)
