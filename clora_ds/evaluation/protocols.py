"""In-domain evaluation protocols: how a task's records become prompts, and how an answer is read from a generation
and judged. These are the rules the CLoRA paper's numbers come from, reproduced exactly (first or last match, case,
tolerance), so that scores compare with published ones.

    commonsense  LLM-Adapters commonsense_evaluate.py (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-e/-c,
                 openbookqa): the FIRST match of `true|false`, `solution1|solution2`, `answer1|...|answer5`,
                 `ending1|...|ending4` or `option1|option2` (case-sensitive, as a substring) in the generated text;
                 correct when it equals `answer`. The pattern is the one of the task's gold answers.
    number       LLM-Adapters evaluate.py (GSM8K, SVAMP, AddSub, MultiArith, SingleEq, MAWPS): commas removed, the
                 LAST `-?\\d+\\.?\\d*` in the text (none: +inf); correct when |pred - answer| <= 0.001.
    choice       LLM-Adapters evaluate.py (AQuA): the FIRST capital A-E in the text; correct when equal to `answer`.
    metamath     MetaMath eval_gsm8k.py (query/response records): the first number after the last "The answer is: "
                 (a fraction a/b evaluated; rounded to an integer, as MetaMath does); correct when equal to the gold
                 number (the response's own "The answer is: X", or `answer`).
    boxed        MATH (problem/solution records, or MetaMath's MATH answers): the content of the LAST \\boxed{...} in
                 the text, else what follows the last "The answer is: " up to ".\\n"; correct when Hendrycks' is_equiv
                 (lm-eval's hendrycks_math utils) says it equals `answer` or the last \\boxed{} of `solution`.

Prompts use the training template (``clora_ds.data``): a model is evaluated the way it was trained.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

from ..data import ALPACA_NO_INPUT, alpaca_prompt
from ..errors import DataError

COMMONSENSE_PATTERNS = {  # gold-answer shape -> the LLM-Adapters regex of that dataset family
    "truefalse": (re.compile(r"^(true|false)$"), r"true|false"),
    "solution": (re.compile(r"^solution[12]$"), r"solution1|solution2"),
    "answer": (re.compile(r"^answer[1-5]$"), r"answer1|answer2|answer3|answer4|answer5"),
    "ending": (re.compile(r"^ending[1-4]$"), r"ending1|ending2|ending3|ending4"),
    "option": (re.compile(r"^option[12]$"), r"option1|option2"),
}
NUMBER_RE = re.compile(r"-?\d+\.?\d*")
METAMATH_NUMBER_RE = re.compile(r"[\-+]?\d*[\.,/]?\d+")
ANSWER_IS = "The answer is: "
NUMBER_TOLERANCE = 1e-3  # LLM-Adapters' `miss`


@dataclass
class EvalItem:
    """One test record, ready to run: its prompt (the training template) and its gold answer."""

    index: int
    prompt: str
    gold: str
    record: dict


@dataclass
class Judged:
    extracted: Optional[str]  # what the protocol read from the generation (None: nothing matched)
    correct: bool


# ---------------------------------------------------------------------------------------------------
# extraction, one function per protocol
# ---------------------------------------------------------------------------------------------------
def extract_commonsense(text: str, pattern: str) -> Optional[str]:
    found = re.findall(pattern, text.strip())
    return found[0] if found else None


def extract_number(text: str) -> float:
    found = NUMBER_RE.findall(text.replace(",", ""))
    return float(found[-1]) if found else math.inf


def extract_choice(text: str) -> Optional[str]:
    found = re.findall(r"A|B|C|D|E", text.strip())
    return found[0] if found else None


def extract_metamath_number(text: str) -> Optional[int]:
    parts = text.split(ANSWER_IS)
    if len(parts) < 2:
        return None
    match = METAMATH_NUMBER_RE.search(parts[-1].strip())
    if not match:
        return None
    value = match.group().replace(",", "")
    if "/" in value:
        numerator, denominator = value.split("/")
        if not numerator.lstrip("+-").replace(".", "", 1).isdigit():
            return None
        if float(denominator) == 0:
            return round(float(numerator))
        return round(float(Fraction(value)))
    number = float(value)
    return None if math.isinf(number) else round(number)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) in ``text``, braces balanced; None when there is none."""
    from lm_eval.tasks.hendrycks_math.utils import last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(text)
    if boxed is None:
        return None
    try:
        return remove_boxed(boxed)
    except AssertionError:  # "\boxed x" without braces, or \fbox
        return boxed.split("{", 1)[-1].rsplit("}", 1)[0]


def extract_boxed(text: str) -> Optional[str]:
    inside = last_boxed(text)
    if inside is not None:
        return inside
    parts = text.split(ANSWER_IS)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    return answer[:-1].strip() if answer.endswith(".") else answer


def math_equivalent(a: str, b: str) -> bool:
    from lm_eval.tasks.hendrycks_math.utils import is_equiv

    return bool(is_equiv(a, b))


# ---------------------------------------------------------------------------------------------------
# a task: its records, protocol and gold answers
# ---------------------------------------------------------------------------------------------------
class Protocol:
    """How one task is prompted and judged; built from its records by ``protocol_for``."""

    name = ""
    # what every record must hold: per entry, one of these keys with a value (the first entry is the prompt's text)
    fields: Tuple[Tuple[str, ...], ...] = (("instruction",), ("answer",))

    def __init__(self, pattern: Optional[str] = None):
        self.pattern = pattern

    def prompt(self, record: dict) -> str:
        return alpaca_prompt(record)

    def gold(self, record: dict) -> str:
        return str(record["answer"]).strip()

    def judge(self, text: str, gold: str) -> Judged:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Commonsense(Protocol):
    name = "commonsense"

    def judge(self, text, gold):
        got = extract_commonsense(text, self.pattern)
        return Judged(got, got == gold)

    def describe(self):
        return f"commonsense (first of {self.pattern})"


class Number(Protocol):
    name = "number"

    def judge(self, text, gold):
        got = extract_number(text)
        return Judged(None if math.isinf(got) else f"{got:g}", abs(float(gold) - got) <= NUMBER_TOLERANCE)


class Choice(Protocol):
    name = "choice"

    def judge(self, text, gold):
        got = extract_choice(text)
        return Judged(got, got == gold)


class MetaMath(Protocol):
    name = "metamath"
    fields = (("query",), ("answer", "response"))

    def prompt(self, record):
        return ALPACA_NO_INPUT.format(instruction=record["query"])

    def gold(self, record):
        if record.get("answer") is not None:
            return str(record["answer"]).strip()
        response = str(record["response"])
        return response.split(ANSWER_IS)[-1].strip() if ANSWER_IS in response else response.strip()

    def judge(self, text, gold):
        try:
            target = float(gold.replace(",", ""))
        except ValueError:  # a MATH-style answer: Hendrycks' equivalence on the extracted text
            got = extract_boxed(text)
            return Judged(got, got is not None and math_equivalent(got, gold))
        got = extract_metamath_number(text)
        return Judged(None if got is None else str(got), got is not None and float(got) == target)


class Boxed(Protocol):
    name = "boxed"
    fields = (("problem",), ("answer", "solution"))

    def prompt(self, record):
        return ALPACA_NO_INPUT.format(instruction=record["problem"])

    def gold(self, record):
        if record.get("answer") is not None:
            return str(record["answer"]).strip()
        return last_boxed(str(record["solution"])) or ""

    def judge(self, text, gold):
        got = extract_boxed(text)
        return Judged(got, got is not None and math_equivalent(got, gold))


def _is_number(value) -> bool:
    try:
        float(str(value).replace(",", ""))
        return True
    except ValueError:
        return False


def _check_fields(records: Sequence[dict], fields: Tuple[Tuple[str, ...], ...], where: str, layout: str) -> None:
    """Every record holds what its protocol reads (``Protocol.fields``). The layout is told by the first record, so
    a record further down that lacks a field would otherwise fail only after the model has loaded."""
    for i, record in enumerate(records, 1):
        for keys in fields:
            key = next((k for k in keys if record.get(k) not in (None, "")), None)
            if key is None:
                need = "its gold answer" if "answer" in keys else "the prompt's text"
                raise DataError(f"{where}: record {i} has no {' or '.join(repr(k) for k in keys)}: an evaluation "
                                f"record needs {need} ({layout})")
            value = record[key]
            number_ok = key == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool)
            if not isinstance(value, str) and not number_ok:
                raise DataError(f"{where}: record {i}'s {key!r} is not a string but {type(value).__name__} "
                                f"({layout})")


def protocol_for(records: Sequence[dict], where: str) -> Protocol:
    """The protocol of a task, from its records' keys and gold answers; DataError naming the record when none fits
    or when any record lacks what the protocol reads."""
    if not records:
        raise DataError(f"{where}: no records")
    keys = set(records[0])
    if {"query", "response"} <= keys:
        _check_fields(records, MetaMath.fields, where, "MetaMath layout: query, response")
        return MetaMath()
    if {"problem", "solution"} <= keys or ({"problem", "answer"} <= keys):
        _check_fields(records, Boxed.fields, where, "MATH layout: problem, solution or answer")
        return Boxed()
    if "instruction" not in keys:
        raise DataError(f"{where}: cannot tell the task's layout from the keys {sorted(keys)}; expected LLM-Adapters "
                        "records (instruction, [input], output, answer), MetaMath (query, response) or MATH "
                        "(problem, solution)")
    _check_fields(records, Protocol.fields, where, "LLM-Adapters layout: instruction, [input], output, answer")
    bad_input = next((i for i, r in enumerate(records, 1) if not isinstance(r.get("input", ""), (str, type(None)))), None)
    if bad_input is not None:
        raise DataError(f"{where}: record {bad_input}'s 'input' is not a string but "
                        f"{type(records[bad_input - 1]['input']).__name__} (LLM-Adapters layout: instruction, [input], "
                        "output, answer)")
    answers = [str(r["answer"]).strip() for r in records]
    shapes = [next((shape for shape, (match, _) in COMMONSENSE_PATTERNS.items() if match.match(a)), None) for a in answers]
    if all(shapes):  # one family, or a mix (commonsense_170k mixes all eight): the union of their patterns
        return Commonsense("|".join(COMMONSENSE_PATTERNS[s][1] for s in COMMONSENSE_PATTERNS if s in set(shapes)))
    if all(re.fullmatch(r"[A-E]", a) for a in answers):
        return Choice()
    if all(_is_number(a) for a in answers):
        return Number()
    odd = next(a for a in answers if not _is_number(a))
    raise DataError(f"{where}: cannot tell the protocol from the answers (e.g. {odd!r}): expected commonsense labels "
                    "(true/false, solution1-2, answer1-5, ending1-4, option1-2), a letter A-E, or a number")


def load_items(records: Sequence[dict], protocol: Protocol) -> List[EvalItem]:
    return [EvalItem(i, protocol.prompt(r), protocol.gold(r), r) for i, r in enumerate(records)]


ANSWER_FORMAT_RE = re.compile(r"Answer format:\s*([A-Za-z0-9]+(?:\s*/\s*[A-Za-z0-9]+)+)")


def candidate_answers(record: dict, protocol: Protocol) -> List[str]:
    """The answer labels a commonsense record offers, for log-likelihood scoring: those of its "Answer format:
    a/b/c" line (every LLM-Adapters commonsense instruction ends with one), else all of its family's labels."""
    if not isinstance(protocol, Commonsense):
        raise DataError("multiple-choice accuracy needs a commonsense-format task (LLM-Adapters labels such as "
                        "true/false, option1/option2, answer1..answer5)")
    found = ANSWER_FORMAT_RE.search(f"{record.get('instruction', '')}\n{record.get('input', '')}")
    labels = [x.strip() for x in found.group(1).split("/")] if found else protocol.pattern.split("|")
    gold = str(record["answer"]).strip()
    return labels if gold in labels else labels + [gold]
