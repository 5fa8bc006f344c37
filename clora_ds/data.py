"""Datasets -> tokenized, prompt-masked, optionally packed batches.

Formats (detected from the keys of the first record when not given):
    alpaca       instruction, [input], output
    commonsense  instruction, [input], output, answer      (LLM-Adapters commonsense_170k)
    metamath     query, response, [type]                    (MetaMathQA)
    messages     messages: [{role, content}, ...]           (chat; loss on assistant turns)
The alpaca template is the one LLM-Adapters / MiLoRA use for commonsense and math data (and so the
CLoRA paper), so results compare with the paper's.

Packing is padding-free: examples are concatenated into rows of at most max_seq_length tokens with
position_ids restarting at 0 for each example and no attention_mask; attention then runs per sequence
(clora_ds.attention for SDPA, varlen flash-attention) or under transformers' block-diagonal causal mask
(eager), so packed examples cannot attend to each other.
"""
from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .errors import DataError

IGNORE_INDEX = -100
TOKENIZATION_VERSION = 2  # part of the tokenized-data cache key: bump whenever tokenize_pieces changes its output

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
}


def alpaca_prompt(record: dict) -> str:
    template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def detect_format(keys) -> Optional[str]:
    keys = set(keys)
    for name in ("messages", "metamath", "commonsense", "alpaca"):  # most specific first
        if set(FORMATS[name]) <= keys:
            return name
    return None


def read_records(path: str) -> List[dict]:
    """Records of a .json / .jsonl / .parquet file; anything unreadable names the file (and line)."""
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
    elif p.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; use .json, .jsonl or .parquet")
    else:
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: byte {raw[err.start]:#04x} at offset {err.start:,} is not UTF-8; save the "
                            "file as UTF-8 text") from None
        records = _parse_json_records(text, path, p.suffix)
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad + 1} is a {type(records[bad]).__name__}, expected a JSON object")
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


def load_records(source: str, split: str = "train") -> List[dict]:
    """Records of a local file or a hub dataset name."""
    if Path(source).suffix in (".json", ".jsonl", ".parquet") or Path(source).exists():
        return read_records(source)
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"{source!r} is not a local file, and the hub is off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set); "
                        "download the dataset first and pass its local .json/.jsonl/.parquet file")
    from datasets import load_dataset

    try:
        ds = load_dataset(source, split=split)
    except Exception as err:  # the hub is often unreachable on compute nodes: say so plainly
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load dataset {source!r}: not a local .json/.jsonl/.parquet file, and the hub said: "
                        f"{first}") from None
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
               "metamath": ("query", "response")}


def _field_type_problem(rec: dict, dataset_format: str) -> Optional[str]:
    """What is not text where text is needed (a number as `output`, a list as `instruction`), or None."""
    def show(v):
        text = json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."

    if dataset_format == "messages":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return f"field 'messages' must be a non-empty list of {{role, content}} objects, found {show(msgs)}"
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"messages[{j}] must be an object with string 'role' and 'content', found {show(m)}"
        return None
    for key in TEXT_FIELDS[dataset_format]:
        value = rec.get(key)
        if value is not None and not isinstance(value, str):
            return (f"field {key!r} is a {type(value).__name__} ({show(value)}), expected a string; quote it in the data "
                    f"(\"{key}\": \"...\")")
    return None


def _chat_text(tokenizer, messages: List[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # no chat template: a plain, documented fallback
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return text + ("### Assistant:\n" if add_generation_prompt else "")


def prompt_response_pairs(record: dict, dataset_format: str, tokenizer) -> List[Tuple[str, bool]]:
    """The example as text pieces, each flagged True where the loss applies (the response)."""
    if dataset_format in ("alpaca", "commonsense"):
        return [(alpaca_prompt(record), False), (record["output"], True)]
    if dataset_format == "metamath":
        return [(ALPACA_NO_INPUT.format(instruction=record["query"]), False), (record["response"], True)]
    pieces, done = [], ""
    msgs = record["messages"]
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            prompt = _chat_text(tokenizer, msgs[:i], add_generation_prompt=True)
            full = _chat_text(tokenizer, msgs[: i + 1], add_generation_prompt=False)
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
    if not pieces:
        raise DataError("a messages record has no assistant turn to learn from")
    return pieces


def loss_token_count(labels) -> int:
    """Tokens that carry a loss: HF predicts labels[1:] (the shift), ignoring IGNORE_INDEX."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


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

    def encode(rec):
        return tokenize_pieces(tokenizer, prompt_response_pairs(rec, fmt, tokenizer), max_len, train_on_prompt)

    ds = Dataset.from_list(records)
    cache = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        key = f"v{TOKENIZATION_VERSION}-{ds._fingerprint}-{tokenizer_fingerprint(tokenizer)}-{fmt}-{max_len}-{int(train_on_prompt)}"
        cache = str(Path(cache_dir) / f"tokenized-{key}.arrow")
    ds = ds.map(encode, remove_columns=ds.column_names, cache_file_name=cache, load_from_cache_file=cache is not None,
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


def pack_examples(examples: List[Dict[str, list]], max_len: int, seed: int) -> List[List[Dict[str, list]]]:
    """Greedy first-fit of shuffled examples into rows of at most max_len tokens (deterministic by seed)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, room = [], []
    for i in order:
        n = len(examples[i]["input_ids"])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(examples[i])
                room[r] -= n
                break
        else:
            rows.append([examples[i]])
            room.append(max_len - n)
    return rows


def _right_pad(rows_ids: List[List[int]], rows_labels: List[List[int]], pad_id: int):
    """input_ids (pad_id) and labels (IGNORE_INDEX) [B, T], right-padded to the longest row."""
    longest = max(map(len, rows_ids))
    ids = torch.full((len(rows_ids), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows_ids), longest), IGNORE_INDEX, dtype=torch.long)
    for b, (row_ids, row_labels) in enumerate(zip(rows_ids, rows_labels)):
        ids[b, :len(row_ids)] = torch.tensor(row_ids)
        labels[b, :len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


def collate_packed(rows: List[List[Dict[str, list]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Padding-free packed batch: input_ids/labels/position_ids [B, T], no attention_mask."""
    ids, labels = _right_pad([[t for ex in row for t in ex["input_ids"]] for row in rows],
                             [[t for ex in row for t in ex["labels"]] for row in rows], pad_id)
    # positions restart per example; trailing pad continues the last example's positions so it cannot
    # look like a new sequence start
    pos = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        t = 0
        for ex in row:
            n = len(ex["input_ids"])
            pos[b, t:t + n] = torch.arange(n)
            t += n
        if t < ids.shape[1]:
            pos[b, t:] = torch.arange(pos[b, t - 1] + 1, pos[b, t - 1] + 1 + ids.shape[1] - t)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def pad_batch(examples: List[Dict[str, list]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/labels/attention_mask [B, T]."""
    ids, labels = _right_pad([e["input_ids"] for e in examples], [e["labels"] for e in examples], pad_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class GlobalBatches:
    """Deterministic order of training units (examples or packed rows) over epochs and ranks.

    Step s of epoch e uses units perm_e[s·G : (s+1)·G] with G = micro · world · accum; micro-batch j of
    rank w takes the slice starting at (j·world + w)·micro. A step is a pure function of (seed, step),
    so resume continues the same sample order. The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, units: list, micro: int, world: int, accum: int, seed: int, packed: bool, pad_id: int):
        self.units, self.micro, self.world, self.accum = units, micro, world, accum
        self.seed, self.packed, self.pad_id = seed, packed, pad_id
        self.global_batch = micro * world * accum
        self.steps_per_epoch = len(units) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(units)} training {'rows' if packed else 'examples'} are fewer than one global batch "
                f"({micro} per device x {world} devices x {accum} accumulation = {self.global_batch})"
            )
        exs = (lambda unit: unit) if packed else (lambda unit: [unit])
        # per-unit counts never change: computed once, not per step on the hot path
        self._loss_tokens = [sum(loss_token_count(ex["labels"]) for ex in exs(u)) for u in units]
        self._real_tokens = [sum(len(ex["input_ids"]) for ex in exs(u)) for u in units]
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> List[int]:
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(len(self.units), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._perm_epoch = epoch
        return self._perm

    def step_indices(self, step: int) -> List[int]:
        """Unit indices of global step ``step`` (0-based), in micro-batch-major, rank-minor order."""
        epoch, s = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[s * self.global_batch:(s + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int) -> Iterator[Dict[str, torch.Tensor]]:
        indices = self.step_indices(step)
        for j in range(self.accum):
            start = (j * self.world + rank) * self.micro
            chunk = [self.units[i] for i in indices[start:start + self.micro]]
            yield collate_packed(chunk, self.pad_id) if self.packed else pad_batch(chunk, self.pad_id)

    def label_tokens(self, step: int) -> int:
        """Tokens that carry a loss in the whole global batch (every rank computes the same number)."""
        return sum(self._loss_tokens[i] for i in self.step_indices(step))

    def real_tokens(self, step: int) -> int:
        return sum(self._real_tokens[i] for i in self.step_indices(step))
