"""Multiple-choice accuracy by log-likelihood: each answer label's continuation is scored, the best one is the
prediction. No generation, so it is cheap and runs under ZeRO-3 (every rank in lockstep): this is the accuracy the
launcher logs during training, and the `clora_mc` lm-eval tasks ask exactly the same questions (their YAMLs call
``choice_request``), so lm-eval's `acc` and this agree on the same model.

For a commonsense record (LLM-Adapters layout) the context is the training prompt and the continuations are its
`output` with the gold label replaced by each label the record offers ("the correct answer is option1" /
"... option2"), so the scored text is what the model was trained to write.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .generation import continuation_logprobs
from .protocols import Commonsense, Protocol, candidate_answers


def choice_request(record: dict, protocol: Protocol) -> Tuple[str, List[str], int]:
    """(context, continuations, index of the gold one) for one commonsense record."""
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


def multiple_choice_accuracy(model, tokenizer, records: Sequence[dict], protocol: Protocol, batch_size: int = 16,
                             device: Optional[torch.device] = None) -> ChoiceResult:
    """Accuracy of picking the gold continuation by summed log-probability; sharded over ranks, same on every rank."""
    if not isinstance(protocol, Commonsense):
        raise ValueError("multiple-choice accuracy needs a commonsense-format task")
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
