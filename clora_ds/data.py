"""Datasets -> tokenized, prompt-masked, optionally packed batches.

Formats (detected from the keys of the first record when not given):
    alpaca       instruction, [input], output
    commonsense  instruction, [input], output, answer      (LLM-Adapters commonsense_170k)
    metamath     query, response, [type]                    (MetaMathQA)
    messages     messages: [{role, content}, ...]           (chat; loss on assistant turns)
    sharegpt     conversations: [{from, value}, ...]         (read as messages; from: human|gpt|system|user|assistant)
    text         text                                       (plain text; loss on every token; also a .txt file:
                                                             one document per blank-line separated block)
    choice       input, choices, label                      (multiple choice, BIG-bench / prepare_assets' bbh
                                                             layout: "Q: {input}\nA:" then " " + choices[label];
                                                             as an eval set also scored for accuracy)
The alpaca template is the one LLM-Adapters / MiLoRA use for commonsense and math data (and so the
CLoRA paper), so results compare with the paper's. alpaca, commonsense, metamath and text are tokenized as one
string, [bos] text [eos]. A chat record (messages, sharegpt) is exactly what the tokenizer's chat template makes of it,
``apply_chat_template(messages, tokenize=True)``, the ids every inference server feeds the model: the template owns
BOS and the end-of-turn tokens, nothing is added; the loss is on each assistant turn's content and its end-of-turn
token (what the template writes after that token on the turn, such as ChatML's newline, is not learned). A tokenizer
without a chat template uses FALLBACK_CHAT_TEMPLATE. docs/data.md has an example of each format.

Packing, the batch order and mixtures of sources: ``clora_ds.batches``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import DataError

IGNORE_INDEX = -100
TOKENIZATION_VERSION = 3  # part of the tokenized-data cache key: bump whenever record_encoder changes its output

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

FORMATS = {  # format -> required keys (optional ones are in the module docstring)
    "alpaca": ("instruction", "output"),
    "commonsense": ("instruction", "output", "answer"),
    "metamath": ("query", "response"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
    "choice": ("input", "choices", "label"),
}
CHAT_FORMATS = ("messages", "sharegpt")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The chat layout of a tokenizer without a chat template: one BOS, "### Role:" headers, and EOS as the assistant's
# end-of-turn token, so that the model learns to stop.
FALLBACK_CHAT_TEMPLATE = (  # string expressions, not bare text: the chat template renderer trims a newline after a tag
    "{{ bos_token or '' }}{% for m in messages %}{{ '### ' + (m['role'] | capitalize) + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


def choice_context(record: dict) -> str:
    """The prompt of a choice record, lm-eval's clora_bbh_mc template (each option follows after a space)."""
    return f"Q: {record['input']}\nA:"


def alpaca_prompt(record: dict) -> str:
    template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def detect_format(keys) -> Optional[str]:
    keys = set(keys)
    for name in ("messages", "sharegpt", "metamath", "commonsense", "alpaca", "choice", "text"):  # most specific first
        if set(FORMATS[name]) <= keys:
            return name
    return None


def read_records(path: str) -> List[dict]:
    """Records of a .json / .jsonl / .parquet file, or of a .txt file (format text: one {"text": ...} record per
    blank-line separated block); anything unreadable names the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a readable parquet file ({p.stat().st_size:,} bytes; {err})") from None
    elif p.suffix not in (".json", ".jsonl", ".txt"):
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; use .json, .jsonl, .parquet or .txt")
    else:
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: byte {raw[err.start]:#04x} at offset {err.start:,} is not UTF-8; save the "
                            "file as UTF-8 text") from None
        records = _text_blocks(text) if p.suffix == ".txt" else _parse_json_records(text, path, p.suffix)
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad + 1} is a {type(records[bad]).__name__}, expected a JSON object")
    return records


def _text_blocks(text: str) -> List[dict]:
    """{"text": block} for each block of non-blank lines (a document); blank (or whitespace-only) lines separate them."""
    records, block = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            block.append(line)
        elif block:
            records.append({"text": "\n".join(block)})
            block = []
    return records


def _parse_json_records(text: str, path: str, suffix: str) -> list:
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if stripped.startswith("["):
                raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        else:
            if isinstance(data, list):
                return data
            raise DataError(f"{path}: holds one JSON {type(data).__name__}; expected a list of records ([{{...}}, ...]) "
                            "or one record per line")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
    return records


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")  # a name ending so is a local file, never a hub dataset


def load_records(source: str, split: str = "train") -> List[dict]:
    """Records of a local file, or of split ``split`` of a hub dataset (a local file has no split: it is ignored)."""
    if Path(source).suffix in DATA_FILE_SUFFIXES or Path(source).exists():
        return read_records(source)
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"{source!r} (split {split}) is not a local file, and the hub is off (HF_DATASETS_OFFLINE / "
                        "HF_HUB_OFFLINE is set); download the dataset first and pass its local .json/.jsonl/.parquet file")
    from datasets import load_dataset

    try:
        ds = load_dataset(source, split=split)
    except Exception as err:  # the hub is often unreachable on compute nodes: say so plainly
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load split {split!r} of dataset {source!r}: not a local .json/.jsonl/.parquet file, "
                        f"and the hub said: {first}") from None
    return ds.to_list()


def check_records(records: List[dict], where: str, dataset_format: Optional[str]) -> str:
    """The format (given or detected); DataError naming the first record that lacks a required field."""
    if not records:
        raise DataError(f"{where}: no records")
    how = "given"
    if dataset_format in (None, "auto"):
        dataset_format = detect_format(records[0].keys())
        how = "detected from the keys"
        if dataset_format is None:
            wanted = "; ".join(f"{n}: {', '.join(req)}" for n, req in FORMATS.items())
            raise DataError(f"{where}: cannot tell the format from the keys {sorted(records[0])}; expected one of {wanted}")
    elif dataset_format not in FORMATS:
        raise DataError(f"unknown dataset_format {dataset_format!r}; choose one of {', '.join(FORMATS)} or auto")
    required = FORMATS[dataset_format]
    for i, rec in enumerate(records, 1):
        missing = [k for k in required if k not in rec or rec[k] is None]
        if missing:
            raise DataError(f"{where}: record {i} lacks field {missing[0]!r}, required by format {dataset_format} ({how})")
        problem = _field_type_problem(rec, dataset_format)
        if problem:
            raise DataError(f"{where}: record {i}: {problem}")
    return dataset_format


TEXT_FIELDS = {"alpaca": ("instruction", "input", "output"), "commonsense": ("instruction", "input", "output", "answer"),
               "metamath": ("query", "response"), "text": ("text",)}


def _field_type_problem(rec: dict, dataset_format: str) -> Optional[str]:
    """What is not text where text is needed (a number as `output`, a list as `instruction`), or None."""
    def show(v):
        text = json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."

    if dataset_format in CHAT_FORMATS:
        return _chat_problem(rec, dataset_format, show)
    if dataset_format == "choice":
        return _choice_problem(rec, show)
    for key in TEXT_FIELDS[dataset_format]:
        value = rec.get(key)
        if value is not None and not isinstance(value, str):
            return (f"field {key!r} is a {type(value).__name__} ({show(value)}), expected a string; quote it in the data "
                    f"(\"{key}\": \"...\")")
    return None


def _choice_problem(rec: dict, show) -> Optional[str]:
    """What makes a choice record unusable (options not a list of 2+ distinct strings, label not an index), or None."""
    choices, label = rec["choices"], rec["label"]
    if not isinstance(rec["input"], str):
        return f"field 'input' is a {type(rec['input']).__name__} ({show(rec['input'])}), expected a string"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return f"field 'choices' must be a list of two or more non-empty strings, found {show(choices)}"
    if len(set(choices)) != len(choices):
        return f"field 'choices' repeats an option ({show(choices)}): the gold one would be ambiguous"
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        return f"field 'label' must be the index of the gold option (0-{len(choices) - 1}), found {show(label)}"
    return None


def _chat_problem(rec: dict, dataset_format: str, show) -> Optional[str]:
    """What makes a messages / sharegpt record unusable (not a list of turns, no assistant turn to learn from), or None."""
    field_name, role_key, text_key = ("messages", "role", "content") if dataset_format == "messages" else \
        ("conversations", "from", "value")
    turns = rec[field_name]
    if not isinstance(turns, list) or not turns:
        return f"field {field_name!r} must be a non-empty list of {{{role_key}, {text_key}}} objects, found {show(turns)}"
    for j, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(text_key), str):
            return f"{field_name}[{j}] must be an object with string {role_key!r} and {text_key!r}, found {show(m)}"
        if dataset_format == "sharegpt" and m[role_key] not in SHAREGPT_ROLES:
            return f"{field_name}[{j}] is from {m[role_key]!r}; ShareGPT turns are from {', '.join(SHAREGPT_ROLES)}"
    roles = [SHAREGPT_ROLES[m[role_key]] if dataset_format == "sharegpt" else m[role_key] for m in turns]
    if "assistant" not in roles:
        return f"{field_name} has no assistant turn to learn from (roles: {', '.join(roles)})"
    if roles[0] == "assistant":
        return (f"{field_name}[0] is an assistant turn; a conversation opens with a system or user turn (the assistant's "
                "reply needs a prompt)")
    return None


def chat_messages(record: dict, dataset_format: str) -> List[dict]:
    """A chat record's turns as [{role, content}, ...]: ShareGPT's {from, value} read through SHAREGPT_ROLES."""
    if dataset_format == "sharegpt":
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return record["messages"]


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatEncoder:
    """Chat messages -> exactly the ids of ``tokenizer.apply_chat_template(messages, tokenize=True)``, and labels.

    The labels are IGNORE_INDEX but on each assistant turn's content and its end-of-turn token, the turn's last special
    token (<|im_end|>, <|eot_id|>, </s>, ...); what the template writes after it on that turn (ChatML's newline) is not
    learned. System and user turns are kept in the ids, without loss. A turn's tokens are located by the template's
    ``{% generation %}`` markers where it has them (``return_assistant_tokens_mask``); otherwise by rendering prefixes:
    assistant turn i spans from the ids of messages[:i] with the generation prompt to the ids of messages[:i+1], and
    both must be prefixes of the whole conversation's ids. A template that renders history differently once later turns
    follow (drops earlier reasoning, changes the system line) fails that check: a DataError, never a silent mis-mask.
    A tokenizer without a chat template uses FALLBACK_CHAT_TEMPLATE.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        own = tokenizer.get_chat_template() if getattr(tokenizer, "chat_template", None) else None
        self.template = own or FALLBACK_CHAT_TEMPLATE
        # return_assistant_tokens_mask needs the character offsets only a fast (Rust) tokenizer gives
        self.marked = bool(_GENERATION_BLOCK.search(self.template)) and getattr(tokenizer, "is_fast", False)
        added = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        self.end_of_turn_ids = (set(tokenizer.all_special_ids) | added) - {tokenizer.unk_token_id}

    def __call__(self, messages: List[dict], max_len: int, train_on_prompt: bool = False) -> Dict[str, list]:
        """input_ids, labels (both truncated to max_len) and full_length, as tokenize_pieces returns them, for messages
        that check_records accepts (an assistant turn, and not first)."""
        ids, spans = self._marked_spans(messages) if self.marked else self._prefix_spans(messages)
        if train_on_prompt:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            for start, end in spans:
                last = next((j for j in range(end - 1, start - 1, -1) if ids[j] in self.end_of_turn_ids), end - 1)
                labels[start:last + 1] = ids[start:last + 1]
        return {"input_ids": ids[:max_len], "labels": labels[:max_len], "full_length": len(ids)}

    def _render(self, conversations: List[List[dict]], add_generation_prompt: bool) -> List[str]:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(conversations, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as err:
            raise DataError(f"the chat template refuses this conversation: {err}") from None

    def _prefix_spans(self, messages: List[dict]) -> Tuple[List[int], List[Tuple[int, int]]]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        histories = [messages[:i + 1] for i in turns] + ([messages] if turns[-1] != len(messages) - 1 else [])
        texts = self._render([messages[:i] for i in turns], True) + self._render(histories, False)
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # as apply_chat_template tokenizes
        ids, spans = list(encoded[-1]), []
        for k, i in enumerate(turns):
            start, end = encoded[k], encoded[len(turns) + k]
            for part, what in ((start, f"messages[:{i}] with the generation prompt"), (end, f"messages[:{i + 1}]")):
                if ids[:len(part)] != part:
                    self._not_a_prefix(part, ids, what)
            if len(end) <= len(start):
                raise DataError(f"the chat template's generation prompt for messages[{i}] holds more than the assistant "
                                f"turn's header as it renders it in the history ({self._show(end[len(end) - 8:])} ends the "
                                f"turn, the prompt is {len(start) - len(end)} tokens longer), so the turn cannot be located")
            spans.append((len(start), len(end)))
        return ids, spans

    def _marked_spans(self, messages: List[dict]) -> Tuple[List[int], List[Tuple[int, int]]]:
        import jinja2

        try:
            out = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as err:
            raise DataError(f"the chat template refuses this conversation: {err}") from None
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"]) + [0]
        spans, start = [], None
        for j, flag in enumerate(mask):
            if flag and start is None:
                start = j
            elif not flag and start is not None:
                spans.append((start, j))
                start = None
        if not spans:
            raise DataError("the chat template's {% generation %} blocks mark no token of this conversation's assistant "
                            "turns, so there is nothing to learn")
        return ids, spans

    def _show(self, ids: List[int]) -> str:
        return repr(self.tokenizer.decode(ids))

    def _not_a_prefix(self, part: List[int], ids: List[int], what: str):
        at = next((j for j, (a, b) in enumerate(zip(part, ids)) if a != b), min(len(part), len(ids)))
        raise DataError(
            f"the chat template renders {what} as tokens that are not a prefix of the whole conversation's (from token "
            f"{at} on it writes {self._show(part[at:at + 8])}, the whole conversation {self._show(ids[at:at + 8])}): it "
            "renders earlier turns differently once later turns follow (for example it drops earlier reasoning or "
            "changes the system line), so the assistant turns cannot be located; use a template that renders the "
            "history as it was, or one with {% generation %} markers")


def prompt_response_pairs(record: dict, dataset_format: str) -> List[Tuple[str, bool]]:
    """A non-chat example as text pieces, each flagged True where the loss applies (the response; all of a text)."""
    if dataset_format in ("alpaca", "commonsense"):
        return [(alpaca_prompt(record), False), (record["output"], True)]
    if dataset_format == "metamath":
        return [(ALPACA_NO_INPUT.format(instruction=record["query"]), False), (record["response"], True)]
    if dataset_format == "text":
        return [(record["text"], True)]
    if dataset_format == "choice":
        return [(choice_context(record), False), (" " + record["choices"][record["label"]], True)]
    raise ValueError(f"{dataset_format} records are tokenized by ChatEncoder, not as text pieces")


def record_encoder(tokenizer, dataset_format: str, max_len: int, train_on_prompt: bool = False):
    """The function tokenizing one record of ``dataset_format`` -> {input_ids, labels, full_length}: chat formats through
    ChatEncoder (the template's ids), the others through tokenize_pieces ([bos] text [eos])."""
    if dataset_format in CHAT_FORMATS:
        chat = ChatEncoder(tokenizer)
        return lambda rec: chat(chat_messages(rec, dataset_format), max_len, train_on_prompt)
    return lambda rec: tokenize_pieces(tokenizer, prompt_response_pairs(rec, dataset_format), max_len, train_on_prompt)


def loss_token_count(labels) -> int:
    """Tokens that carry a loss: HF predicts labels[1:] (the shift), ignoring IGNORE_INDEX."""
    tail = labels[1:]
    return len(tail) - tail.count(IGNORE_INDEX)  # list.count: C speed, every epoch of a mixture recounts its units


def tokenize_pieces(tokenizer, pieces: List[Tuple[str, bool]], max_len: int, train_on_prompt: bool) -> Dict[str, list]:
    """[bos] text [eos] with labels IGNORE_INDEX outside responses (and on bos, always); truncated to max_len.

    The text is tokenized whole, as LLM-Adapters' finetune.py and every inference tool (generation from the prompt,
    lm-eval's continuation scoring, vLLM) tokenize it; a piece's tokens are those between the token counts of the
    text up to its start and up to its end. Tokenizing pieces separately would give a response a leading-space
    token ("▁the" after "Response:\n") that the model never meets when the prompt and answer are one string.
    """
    ids = tokenizer("".join(t for t, _ in pieces), add_special_tokens=False)["input_ids"]
    labels, text, start = [], "", 0
    for piece, is_response in pieces:
        text += piece
        end = len(ids) if len(text) == sum(len(t) for t, _ in pieces) else \
            len(tokenizer(text, add_special_tokens=False)["input_ids"])
        labels += ids[start:end] if (is_response or train_on_prompt) else [IGNORE_INDEX] * (end - start)
        start = end
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] + labels + [tokenizer.eos_token_id]
    full_len = len(ids)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "full_length": full_len}


def tokenize_example(tokenizer, prompt: str, response: str, max_len: int, train_on_prompt: bool = False) -> Dict[str, list]:
    return tokenize_pieces(tokenizer, [(prompt, False), (response, True)], max_len, train_on_prompt)


@dataclass
class TokenizedData:
    examples: List[Dict[str, list]]  # input_ids, labels
    dataset_format: str
    n_records: int
    n_truncated: int
    n_dropped: int


def default_cache_dir() -> Path:
    """Where tokenized data is cached by default: the datasets cache (HF_DATASETS_CACHE), never the output directory,
    so that checking a run's data writes nothing there."""
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "clora_ds"


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what decides the token ids: vocabulary and rules, special tokens, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)]).encode())
    return h.hexdigest()[:16]


def units_fingerprint(units: list, packed: bool) -> str:
    """sha256 of the training units' token ids and labels, in order: what a step's data is made of."""
    h = hashlib.sha256(b"packed" if packed else b"examples")
    for unit in units:
        for ex in (unit if packed else [unit]):
            h.update(array("q", ex["input_ids"]).tobytes())
            h.update(array("q", ex["labels"]).tobytes())
        h.update(b"|")
    return h.hexdigest()


def tokenize_records(records, where, tokenizer, dataset_format, max_len, train_on_prompt=False, cache_dir=None) -> TokenizedData:
    """Check, tokenize (cached through ``datasets`` in ``cache_dir``; None: in memory), truncate; drop examples left
    with no response token."""
    from datasets import Dataset

    fmt = check_records(records, where, dataset_format)
    encode_record = record_encoder(tokenizer, fmt, max_len, train_on_prompt)

    def encode(rec, index):
        try:
            return encode_record(rec)
        except DataError as err:  # a template that cannot be masked exactly: name the record
            raise DataError(f"{where}: record {index + 1}: {err}") from None

    ds = Dataset.from_list(records)
    cache = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        key = f"v{TOKENIZATION_VERSION}-{ds._fingerprint}-{tokenizer_fingerprint(tokenizer)}-{fmt}-{max_len}-{int(train_on_prompt)}"
        cache = str(Path(cache_dir) / f"tokenized-{key}.arrow")
    ds = ds.map(encode, with_indices=True, remove_columns=ds.column_names, cache_file_name=cache, load_from_cache_file=cache is not None,
                desc="tokenizing")
    examples, truncated, dropped = [], 0, 0
    for ex in ds:
        if ex["full_length"] > max_len:
            truncated += 1
        if loss_token_count(ex["labels"]) == 0:
            dropped += 1
            continue
        examples.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    if not examples:
        raise DataError(
            f"{where}: all {len(records)} examples were dropped: {truncated} are longer than max_seq_length={max_len} "
            f"and none keeps a response token after truncation. Raise --max_seq_length or shorten the prompts."
        )
    return TokenizedData(examples, fmt, len(records), truncated, dropped)
