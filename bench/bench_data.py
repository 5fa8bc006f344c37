"""Data-pipeline benchmarks, one part per `--what`: packing (clora_ds.batches.pack_row_indices against the first-fit
packer it replaced), chat (chat records tokenized token-exact by clora_ds.data.ChatEncoder against the path it replaced).

    OMP_NUM_THREADS=1 taskset -c 0 python bench/bench_data.py --what packing
    python bench/bench_data.py --what chat                    # 100,000 records; --chat_tokenizer DIR to choose one
    python bench/bench_data.py --what packing --examples 20000 --baseline_examples 5000,10000   # a quick look

Every part runs on one core: the script sets OMP_NUM_THREADS=1 before torch is imported and pins itself to one CPU
(os.sched_setaffinity, Linux) when it can, so `taskset` is optional. Each part prints a table.

**packing**: `--examples` (395,000: MetaMathQA's size) example lengths drawn from `metamath_like_lengths` packed into
rows of `--max_len` (2,048) tokens; time (median of `--rounds`) and fill ratio = tokens / (rows x max_len). The
baseline is today's first-fit over every open row in Python (`first_fit_rows`, copied from the packer as it was before
best-fit decreasing), which is quadratic: it is timed on the `--baseline_examples` subsamples (the first N lengths of
the same draw), and the new packer on the same subsamples too, so each fill ratio has its pair.

**chat**: `--chat_records` (100,000) synthetic multi-turn `messages` records (`synthetic_chat_records`: a system prompt
in half of them, 1-4 exchanges, lognormal turn lengths of UltraChat-like conversations) tokenized one by one, records/s
(per CPU second of the process, and the wall time) of each path on the same records: the new path (`clora_ds.data.record_encoder`: the template's own ids, batched renders
and one batched tokenizer call per record) and the path it replaced (`old_chat_example`, copied from clora_ds/data.py
before the change: text pieces from prefix renders, then [bos] text [eos] with a tokenizer call per piece). Also the
share of the first `--chat_check` records whose ids equal `apply_chat_template(messages, tokenize=True)`. The tokenizer
is SmolLM2-135M-Instruct's (`--chat_tokenizer`, default: the test assets' copy, `launch/prepare_assets.py smollm2`)
when it is there, else a sentencepiece tokenizer trained here with a ChatML template (the table says which).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one core, as the figures are quoted
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# MetaMathQA: 395K examples, 240K bootstrapped from GSM8K and 155K from MATH (Yu et al. 2023, arXiv 2309.12284).
# The token lengths below (prompt in the alpaca template + response, LLaMA tokenizer) are OUR ASSUMPTION, not fitted to
# the dataset (it is not reachable here): each source lognormal, GSM8K-derived median 230 tokens (sigma 0.35: short
# word problems with a few lines of working), MATH-derived median 330 (sigma 0.70: a heavier tail of long solutions),
# clipped to [48, 2048] (the template alone is ~45 tokens; longer examples are truncated to the row length).
METAMATH_SOURCES = ((240_000 / 395_000, 230.0, 0.35), (155_000 / 395_000, 330.0, 0.70))


def metamath_like_lengths(n: int, seed: int = 0, max_len: int = 2048):
    """[n] int64 token lengths from the two-lognormal MetaMathQA-like mixture above, in a seeded random order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    source = rng.choice(len(METAMATH_SOURCES), size=n, p=[w for w, _, _ in METAMATH_SOURCES])
    median = np.array([m for _, m, _ in METAMATH_SOURCES])[source]
    sigma = np.array([s for _, _, s in METAMATH_SOURCES])[source]
    return np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(n))), 48, max_len).astype(np.int64)


def first_fit_rows(lengths, max_len: int, seed: int):
    """The packer before best-fit decreasing (clora_ds/data.py pack_examples until this bench was written), on
    lengths instead of examples: greedy first-fit of a seeded shuffle, scanning every open row in Python."""
    import torch

    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, room = [], []
    for i in order:
        n = int(lengths[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


def fill_ratio(rows, lengths, max_len: int) -> float:
    return sum(int(lengths[i]) for row in rows for i in row) / (len(rows) * max_len)


def _timed(fn, rounds: int):
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_packing(args) -> None:
    from clora_ds.batches import pack_row_indices

    import numpy as np

    lengths = metamath_like_lengths(args.examples, seed=args.seed, max_len=args.max_len)
    baseline = {int(s) for s in args.baseline_examples.split(",") if s.strip()}
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "not settable here"
    print(f"## packing: MetaMathQA-like lengths (mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, p95 "
          f"{np.percentile(lengths, 95):.0f}, max {lengths.max()} tokens) into rows of {args.max_len}; CPU affinity "
          f"{affinity}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; best-fit decreasing: median of {args.rounds} "
          "rounds, first-fit: one round\n")
    print("| examples | packer | seconds | rows | fill ratio | rows / first-fit rows |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in sorted(baseline | {args.examples}):
        sub = lengths[:n]
        old_rows = None
        if n in baseline:
            old_s, old_rows = _timed(lambda: first_fit_rows(sub, args.max_len, args.seed), 1)
            print(f"| {n:,} | first-fit (before) | {old_s:.2f} | {len(old_rows):,} | "
                  f"{fill_ratio(old_rows, sub, args.max_len):.4f} | 1.000 |")
        new_s, new_rows = _timed(lambda: pack_row_indices(sub, args.max_len, args.seed), args.rounds)
        versus = f"{len(new_rows) / len(old_rows):.3f}" if old_rows else "first-fit not run (quadratic)"
        print(f"| {n:,} | best-fit decreasing | {new_s:.2f} | {len(new_rows):,} | "
              f"{fill_ratio(new_rows, sub, args.max_len):.4f} | {versus} |")
    print()


# ---------------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------------
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def old_chat_text(tokenizer, messages, add_generation_prompt: bool) -> str:
    """clora_ds/data.py _chat_text before the change (git show 0095e07:clora_ds/data.py)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return text + ("### Assistant:\n" if add_generation_prompt else "")


def old_chat_pieces(messages, tokenizer):
    """prompt_response_pairs' messages branch before the change."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = old_chat_text(tokenizer, messages[:i], add_generation_prompt=True)
            full = old_chat_text(tokenizer, messages[: i + 1], add_generation_prompt=False)
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
    return pieces


def old_chat_example(tokenizer, record, max_len: int):
    from clora_ds.data import tokenize_pieces  # unchanged: [bos] text [eos]; what it did to chat records was the bug

    return tokenize_pieces(tokenizer, old_chat_pieces(record["messages"], tokenizer), max_len, False)


def synthetic_chat_records(n: int, seed: int = 0):
    """[n] messages records: a system prompt in half, 1-4 user/assistant exchanges (mean 2.2), user turns of median
    25 words and assistant turns of median 110 (lognormal, sigma 0.6 and 0.5; words from a fixed English list). OUR
    ASSUMPTION of UltraChat/ShareGPT-like shapes, not fitted to a dataset (none is reachable here)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = ("the of and to in is that it for on with as was be by this are or at from have not an they which you one "
             "all were we there can more when use your how each she do many some so these would other into has her "
             "two like him see time could no make than first been its who now people my made over did down only way "
             "find water long little very after words called just where most know get through back much before go "
             "good new write our used me man too any day same right look think also around another came come work "
             "three word must because does part even place well such here take why help put different away again off "
             "went old number great tell men say small every found still between name should home big give air line "
             "set own under read last never us left end along while might next sound below saw something thought both "
             "few those always show large often together asked house world going want school important until form "
             "food keep children feet land side without boy once animal life enough took four head above kind began "
             "almost live page got earth need far hand high year mother light country father let night picture being "
             "study second soon story since white ever paper hard near sentence better best across during today "
             "however sure knew it's try told young sun thing whole hear example heard several change answer room sea "
             "against top turned learn point city play toward five himself usually money seen didn't car morning I'm "
             "body upon family later turn move face door cut done group true leave color red friend pretty eat front "
             "feel fact hour rock").split()
    vocab = np.array(words)

    def sentence(n_words):
        text = " ".join(vocab[rng.integers(0, len(vocab), max(1, n_words))])
        return text[0].upper() + text[1:] + "."

    records = []
    for i in range(n):
        messages = [{"role": "system", "content": sentence(int(rng.integers(8, 30)))}] if i % 2 == 0 else []
        for _ in range(int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))):
            messages.append({"role": "user", "content": sentence(int(round(25 * np.exp(0.6 * rng.standard_normal()))))})
            messages.append({"role": "assistant",
                             "content": sentence(int(round(110 * np.exp(0.5 * rng.standard_normal()))))})
        records.append({"messages": messages})
    return records


def chat_tokenizer(path):
    """(tokenizer, description): the SmolLM2 asset where it is, else a tokenizer trained here with a ChatML template."""
    from transformers import AutoTokenizer

    if path and Path(path, "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path)), f"SmolLM2-135M-Instruct's ({path})"
    import tempfile

    from clora_ds.tiny import train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="bench_chat_tok-"))
    texts = [m["content"] for r in synthetic_chat_records(2000, seed=1) for m in r["messages"]]
    tok = train_tokenizer(texts + ["system user assistant"] * 50, out, vocab_size=2000)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok, "a sentencepiece BPE (2,000 pieces) trained here, ChatML template (no SmolLM2 asset found)"


def bench_chat(args) -> None:
    from clora_ds.data import record_encoder

    default = Path(os.environ.get("CLORA_DS_TEST_ASSETS", Path.home() / ".cache" / "clora_ds" / "test_assets"))
    tok, which = chat_tokenizer(args.chat_tokenizer or default / "smollm2-135m-instruct")
    records = synthetic_chat_records(args.chat_records, seed=args.seed)
    new = record_encoder(tok, "messages", args.chat_max_len)
    tokens = turns = 0
    check = records[:args.chat_check]
    exact = {"new": 0, "old": 0}
    for rec in check:
        want = list(tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True)["input_ids"])
        exact["new"] += new(rec)["input_ids"] == want
        exact["old"] += old_chat_example(tok, rec, args.chat_max_len)["input_ids"] == want
    results = {}  # name -> (wall seconds, CPU seconds of this process: what a busy machine does not inflate)
    for name, encode in (("new: ChatEncoder (apply_chat_template's ids)", new),
                         ("before: text pieces, [bos] text [eos]", lambda rec: old_chat_example(tok, rec, args.chat_max_len))):
        start, cpu = time.perf_counter(), time.process_time()
        for rec in records:
            ex = encode(rec)
            if name.startswith("new"):
                tokens += ex["full_length"]
        results[name] = (time.perf_counter() - start, time.process_time() - cpu)
    turns = sum(len(r["messages"]) for r in records)
    print(f"## chat: {len(records):,} synthetic multi-turn records ({turns / len(records):.1f} turns, "
          f"{tokens / len(records):.0f} tokens a record on average), tokenizer: {which}; one core, one pass each\n")
    print("| path | wall s | CPU s | records per CPU s | tokens per CPU s | ids == apply_chat_template (first "
          f"{len(check):,}) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (wall, cpu) in results.items():
        key = "new" if name.startswith("new") else "old"
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {len(records) / cpu:,.0f} | {tokens / cpu:,.0f} | "
              f"{exact[key] / max(1, len(check)):.1%} |")
    (new_wall, new_cpu), (old_wall, old_cpu) = results.values()
    print(f"\nnew / before records/s: {old_cpu / new_cpu:.2f} by CPU time, {old_wall / new_wall:.2f} by wall time\n")


PARTS = {"packing": bench_packing, "chat": bench_chat}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default=",".join(PARTS), help=f"comma-separated parts to run: {', '.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=0)
    packing = parser.add_argument_group("packing")
    packing.add_argument("--examples", type=int, default=395_000, help="examples packed by the new packer")
    packing.add_argument("--max_len", type=int, default=2048, help="row length in tokens")
    packing.add_argument("--baseline_examples", default="10000,20000,40000",
                         help="subsample sizes (comma-separated) on which first-fit is timed beside the new packer")
    packing.add_argument("--rounds", type=int, default=3, help="rounds of the new packer (median reported)")
    chat = parser.add_argument_group("chat")
    chat.add_argument("--chat_records", type=int, default=100_000, help="synthetic multi-turn records tokenized")
    chat.add_argument("--chat_tokenizer", default=None,
                      help="a tokenizer directory (default: the test assets' SmolLM2-135M-Instruct, else one trained here)")
    chat.add_argument("--chat_max_len", type=int, default=4096, help="max_seq_length the records are truncated to")
    chat.add_argument("--chat_check", type=int, default=1000,
                      help="records whose ids are compared with apply_chat_template(messages, tokenize=True)")
    args = parser.parse_args(argv)
    unknown = [w for w in args.what.split(",") if w.strip() not in PARTS]
    if unknown:
        parser.error(f"--what {unknown}: choose from {', '.join(PARTS)}")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    for what in args.what.split(","):
        PARTS[what.strip()](args)


if __name__ == "__main__":
    main()
