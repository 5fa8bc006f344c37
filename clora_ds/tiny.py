"""A tiny LLaMA, a sentencepiece tokenizer and sample data, all built locally.

Used by the CPU demo and by the tests: nothing here touches the network. Sizes are deliberately odd
(hidden 40, GQA 4 query / 2 key-value heads, intermediate 72) so shape bugs cannot hide.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, List, Optional, Union

TINY_LLAMA = dict(
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def sample_records(n: int = 256, seed: int = 0) -> List[dict]:
    """Alpaca-style records of small arithmetic and word tasks: learnable by a tiny model."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pepper", "violet", "candle"]
    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            records.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}"})
        elif kind == 1:
            w = rng.choice(words)
            records.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
        else:
            ws = rng.sample(words, 3)
            records.append({"instruction": "Sort these words.", "input": " ".join(ws), "output": " ".join(sorted(ws))})
    return records


FRUITS = ["apple", "pear", "grape", "lemon", "mango", "peach", "plum", "melon", "cherry", "olive"]
ANIMALS = ["tiger", "horse", "zebra", "eagle", "snake", "mouse", "otter", "camel", "whale", "goose"]


COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
TOOLS = ["hammer", "saw", "drill", "wrench", "shovel", "chisel", "rake", "pliers", "ladder", "file"]


# How a question is introduced: wording 0 is LLM-Adapters' own (boolq's, winogrande's); the others are paraphrases,
# so that a test split can ask trained facts in wordings never trained (demo_splits)
BOOL_WORDINGS = ["Please answer the following question with true or false",
                 "Answer the following question with true or false",
                 "Please reply to this question with true or false",
                 "Tell me with true or false",
                 "Answer with true or false",
                 "Please respond with true or false",
                 "Say true or false for the following question",
                 "Kindly answer this question with true or false",
                 "Answer using true or false",
                 "Reply true or false"]
OPTION_WORDINGS = ["Please choose the correct answer to fill in the blank to complete the given sentence",
                   "Choose the correct answer to fill in the blank of the sentence",
                   "Please pick the answer that fills the blank in the given sentence",
                   "Fill in the blank of this sentence with the correct answer",
                   "Choose the word that fills the blank",
                   "Please fill in the blank to complete the sentence",
                   "Select the right answer for the blank",
                   "Kindly choose the answer that fills the blank in the sentence",
                   "Please select the right answer for the blank in the sentence",
                   "Pick the correct answer to fill in the blank"]


def fact_record(word: str, kind: str, members=FRUITS, category: str = "fruit", other: str = "animal",
                wording: int = 0) -> dict:
    """One commonsense-format question (LLM-Adapters layout) about whether ``word`` is a ``category`` (one of
    ``members``) or an ``other``: asked as boolq asks (kind "bool": true/false) or as winogrande asks (kind "option":
    option1 = category, option2 = other), introduced by ``BOOL_WORDINGS`` / ``OPTION_WORDINGS[wording]``. The tests
    ask about fruits and animals; bench_forgetting also about colours and tools."""
    inside = word in members
    article = "an" if word[0] in "aeiou" else "a"
    if kind == "bool":
        answer = "true" if inside else "false"
        instruction = (f"{BOOL_WORDINGS[wording]}, question: is {word} a {category}?\n\n"
                       "Answer format: true/false")
    else:
        answer = "option1" if inside else "option2"
        instruction = (f"{OPTION_WORDINGS[wording]}: {article} "
                       f"{word} is a _\n\nOption1: {category} Option2: {other} Answer format: option1/option2")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def fact_splits(seed: int = 0, held_out_per_class: int = 3, repeat: int = 8):
    """(train, test) records of the tests' small world of facts (which of 20 words are fruits). Train: the true/false
    question for every word, the option question for all but ``held_out_per_class`` fruits and animals (each repeated
    ``repeat`` times). Test: both questions for the held-out words; the option ones ask a fact the adapter was taught
    only in the other format. A base model never answers in either format."""
    rng = random.Random(seed)
    held = set(rng.sample(FRUITS, held_out_per_class) + rng.sample(ANIMALS, held_out_per_class))
    train = [fact_record(w, "bool") for w in FRUITS + ANIMALS] + \
            [fact_record(w, "option") for w in FRUITS + ANIMALS if w not in held]
    test = [fact_record(w, kind) for w in sorted(held) for kind in ("option", "bool")]
    return train * repeat, test


def demo_splits(train_wordings: int = 8) -> tuple:
    """(train, test) records of the CPU demo: whether each of 20 words is a fruit or an animal, asked as boolq and
    as winogrande ask. Train: every word in both forms, in the first ``train_wordings`` wordings of each form. Test:
    the same facts in the remaining wordings (2 x 20 x 2 = 80 questions by default), never trained: the adapter must
    recall the fact and answer in the form asked, whatever the question's wording."""
    words = FRUITS + ANIMALS
    wordings = range(min(len(BOOL_WORDINGS), len(OPTION_WORDINGS)))
    def asked(which):
        return [fact_record(w, kind, wording=i) for i in which for w in words for kind in ("bool", "option")]

    return asked(wordings[:train_wordings]), asked(wordings[train_wordings:])


def write_jsonl(path: Union[str, Path], records: List[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_sample_data(path: Union[str, Path], n: int = 256, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in sample_records(n, seed):
            f.write(json.dumps(rec) + "\n")
    return path


def train_tokenizer(texts: List[str], output_dir: Union[str, Path], vocab_size: int = 300):
    """Train a BPE sentencepiece model on ``texts`` and save it as a HF LlamaTokenizer in ``output_dir``."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    corpus = output_dir / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(output_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    corpus.unlink()
    (output_dir / "tokenizer.vocab").unlink(missing_ok=True)
    # transformers 5: LlamaTokenizer(vocab_file=...) builds an empty tokenizer; from_pretrained converts.
    tokenizer = LlamaTokenizer.from_pretrained(str(output_dir), add_bos_token=True)  # as LLaMA's own tokenizers
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def record_text(rec: dict) -> str:
    return f"{rec['instruction']} {rec.get('input', '')} {rec['output']}".strip()


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM of TINY_LLAMA sizes (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM(config)


def make_demo_assets(root: Union[str, Path], seed: int = 0, splits: Optional[Callable[[], tuple]] = None) -> dict:
    """A fact task's assets under ``root``: data/train.jsonl and data/test.jsonl (``splits()``: the CPU demo passes
    ``demo_splits``; default ``fact_splits(seed)``, the tests' small world), a tokenizer and a tiny random LLaMA whose
    output layer is scaled up (initializer_range 0.1, lm_head x 20). With the default init (std 0.02) a frozen random
    output layer caps every logit below ~1, so no adapter can lower the loss much."""
    import torch

    root = Path(root)
    train, test = splits() if splits else fact_splits(seed)
    write_jsonl(root / "data" / "train.jsonl", train)
    write_jsonl(root / "data" / "test.jsonl", test)
    tokenizer = train_tokenizer([f"{r['instruction']} {r['output']}" for r in train + test], root / "model")
    model = build_tiny_llama(len(tokenizer), seed, initializer_range=0.1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(str(root / "model"))
    return {"train": root / "data" / "train.jsonl", "test": root / "data" / "test.jsonl", "model": root / "model"}


def make_tiny_assets(root: Union[str, Path], seed: int = 0, n_records: int = 256) -> dict:
    """Write data (train.jsonl), a tokenizer and a saved tiny model under ``root``; return their paths."""
    root = Path(root)
    data = write_sample_data(root / "data" / "train.jsonl", n_records, seed)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    tokenizer = train_tokenizer([record_text(r) for r in records], root / "model")
    model = build_tiny_llama(len(tokenizer), seed)
    model.save_pretrained(str(root / "model"))
    return {"data": data, "model": root / "model"}
