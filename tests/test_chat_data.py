"""Chat records token-exact (the ids of apply_chat_template, the loss on the assistant turns and their end-of-turn
token), ShareGPT read as messages, the plain-text format, and a tiny model trained on chat data by the launcher.

The LLaMA-3 and LLaMA-2-chat templates are the logic of Meta's released ones (Meta-Llama-3-8B-Instruct,
Llama-2-7b-chat-hf), set on a sentencepiece tokenizer trained here with those models' special tokens added;
SmolLM2-Instruct's ChatML with its real tokenizer is checked in tests/test_assets.py, where that asset is made.
"""
import json
import sys

import pytest

from conftest import DATA, ROOT, run_checked

CHAT = DATA / "chat_tiny.jsonl"

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHATML_MARKED = (  # ChatML with {% generation %} around what the assistant writes (as TRL's templates mark it)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}{{ m['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Templates that render the history differently once later turns follow: the prefix check must refuse them.
DROPS_EARLIER_REASONING = (  # as reasoning models' templates do: only the last assistant turn keeps its <think> part
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM_LINE_CHANGES = (  # the system line says whether the conversation has started
    "{{ '<|im_start|>system\n' + ('ongoing' if messages | selectattr('role', 'equalto', 'assistant') | list else 'new')"
    " + '<|im_end|>\n' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MARKUP = "system user assistant [INST] [/INST] <<SYS>> <</SYS>> ### System: ### User: ### Assistant: <think> </think>"


def chat_records():
    return [json.loads(line) for line in CHAT.read_text().splitlines()]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A sentencepiece tokenizer trained on the chat data (and the templates' markup), saved; no chat template.
    Its normalizer would drop newlines (and shift the character offsets after them), so "\n" is a token of its own,
    as in the real models' vocabularies (LLaMA's byte <0x0A>, ChatML's "Ċ")."""
    from tokenizers import AddedToken

    from clora_ds.tiny import train_tokenizer

    texts = [m["content"] for r in chat_records() for m in r["messages"]] + [MARKUP] * 20
    out = tmp_path_factory.mktemp("chat_sp") / "tokenizer"
    tok = train_tokenizer(texts, out, vocab_size=250)
    tok.add_tokens([AddedToken("\n", normalized=False)])
    tok.save_pretrained(str(out))
    return out


def styled(sp_dir, style):
    """The trained tokenizer dressed as LLaMA-3-Instruct's, LLaMA-2-chat's or a ChatML one (special tokens and template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sp_dir))
    if style == "llama3":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
        tok.chat_template = LLAMA3_TEMPLATE
    elif style == "llama2":
        tok.chat_template = LLAMA2_TEMPLATE  # <s>, </s> are the sentencepiece model's own
    elif style != "none":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = {"chatml_marked": CHATML_MARKED, "drops_reasoning": DROPS_EARLIER_REASONING,
                             "system_changes": SYSTEM_LINE_CHANGES}[style]
    return tok


def labelled_spans(tok, example):
    """The decoded runs of labelled tokens (labels != IGNORE_INDEX), in order."""
    from clora_ds.data import IGNORE_INDEX

    spans, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    return [tok.decode(s) for s in spans + ([run] if run else [])]


def assert_token_exact(tok, records, end_of_turn, fmt="messages", chat_template=None):
    """Every record's ids are apply_chat_template's (with ``chat_template``: the tokenizer's own when None) and its
    labelled runs are its assistant turns + end_of_turn."""
    from clora_ds.data import chat_messages, tokenize_records

    data = tokenize_records(records, "chat.jsonl", tok, fmt, max_len=1024)
    assert data.n_dropped == 0 and data.n_truncated == 0 and len(data.examples) == len(records)
    for rec, ex in zip(records, data.examples):
        messages = chat_messages(rec, fmt)
        want = tok.apply_chat_template(messages, chat_template=chat_template, tokenize=True, return_dict=True)
        assert ex["input_ids"] == list(want["input_ids"])
        assert labelled_spans(tok, ex) == [end_of_turn(m["content"]) for m in messages if m["role"] == "assistant"]
    return data


@pytest.mark.parametrize("style, end_of_turn", [
    ("llama3", lambda content: content + "<|eot_id|>"),
    ("llama2", lambda content: content + " </s>"),  # the template writes ' ' + content + ' ' + eos_token
    ("chatml_marked", lambda content: content + "<|im_end|>"),  # located by the {% generation %} markers
    ("none", lambda content: content + "</s>"),  # FALLBACK_CHAT_TEMPLATE: EOS ends each assistant turn
])
def test_multi_turn_records_with_a_system_prompt_are_the_templates_ids_and_learn_only_the_assistant_turns(
        sp_dir, style, end_of_turn):
    from clora_ds.data import FALLBACK_CHAT_TEMPLATE

    tok = styled(sp_dir, style)
    records = chat_records()
    assert all(r["messages"][0]["role"] == "system" for r in records)
    assert {len(r["messages"]) for r in records} == {3, 5, 7}  # one to three assistant turns
    if style == "none":  # no template of its own: the documented fallback, as apply_chat_template renders it
        assert not tok.chat_template
    data = assert_token_exact(tok, records, end_of_turn, chat_template=FALLBACK_CHAT_TEMPLATE if style == "none" else None)
    first = data.examples[0]["input_ids"]
    if style != "chatml_marked":  # (ChatML has no BOS)
        assert first[0] == tok.bos_token_id and first[1] != tok.bos_token_id  # the template's BOS, nothing prepended
    if style in ("llama3", "none"):
        assert all(ex["input_ids"].count(tok.bos_token_id) == 1 for ex in data.examples)
    if style == "llama3":  # ends on the template's own end-of-turn token: no EOS appended
        assert all(ex["input_ids"][-1] == tok.convert_tokens_to_ids("<|eot_id|>") for ex in data.examples)
    if style == "none":  # the fallback's text, so the tokens around the turns are the documented ones
        text = tok.decode(first)
        assert text.startswith("<s>### System:\nYou name the colour of things.\n\n### User:\nWhat colour is"), text
        assert "?\n\n### Assistant:\nColour: " in text and text.endswith(".</s>\n\n"), text


def test_sharegpt_records_are_read_as_messages(sp_dir):
    from clora_ds.data import check_records, detect_format, tokenize_records

    tok = styled(sp_dir, "llama3")
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    records = chat_records()
    sharegpt = [{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in r["messages"]]}
                for r in records]
    sharegpt[1]["conversations"][1]["from"] = "user"  # "user" / "assistant" are accepted too
    assert detect_format(sharegpt[0]) == "sharegpt"
    assert tokenize_records(sharegpt, "sg.jsonl", tok, "auto", 1024).examples == \
        tokenize_records(records, "m.jsonl", tok, "auto", 1024).examples
    bad = [dict(sharegpt[0]), {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]
    with pytest.raises(Exception, match=r"sg\.jsonl: record 2: conversations\[1\] is from 'bot'; ShareGPT turns are "
                                        r"from human, user, gpt, assistant, system"):
        check_records(bad, "sg.jsonl", None)


@pytest.mark.parametrize("record, problem", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages has no assistant turn to learn from"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]},
     r"messages\[0\] is an assistant turn"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\] must be an object with string 'role' and 'content'"),
])
def test_unusable_chat_records_are_named_before_tokenizing(record, problem):
    from clora_ds.data import check_records
    from clora_ds.errors import DataError

    good = chat_records()[0]
    with pytest.raises(DataError, match=rf"chat\.jsonl: record 2: {problem}"):
        check_records([good, record], "chat.jsonl", None)


@pytest.mark.parametrize("style, record", [
    ("drops_reasoning", {"messages": [
        {"role": "user", "content": "What colour is snow?"}, {"role": "assistant", "content": "<think>cold</think>white"},
        {"role": "user", "content": "And coal?"}, {"role": "assistant", "content": "<think>dark</think>black"}]}),
    ("system_changes", {"messages": [
        {"role": "user", "content": "What colour is snow?"}, {"role": "assistant", "content": "Colour: white."}]}),
])
def test_a_template_that_renders_the_history_differently_is_a_clear_error_not_a_mis_mask(sp_dir, style, record):
    from clora_ds.data import tokenize_records
    from clora_ds.errors import DataError

    tok = styled(sp_dir, style)
    whole = tok.apply_chat_template(record["messages"], tokenize=False)
    assert ("cold" not in whole) if style == "drops_reasoning" else ("ongoing" in whole)  # the templates do differ
    with pytest.raises(DataError, match=r"chat\.jsonl: record 1: the chat template renders messages\[:\d\].* not a "
                                        r"prefix of the whole conversation's"):
        tokenize_records([record], "chat.jsonl", tok, "messages", 1024)


def test_a_template_error_names_the_record(sp_dir):
    from clora_ds.data import tokenize_records
    from clora_ds.errors import DataError

    two_users = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "yo"}]}
    with pytest.raises(DataError, match=r"c\.jsonl: record 1: the chat template refuses this conversation: "
                                        r"Conversation roles must alternate"):
        tokenize_records([two_users], "c.jsonl", styled(sp_dir, "llama2"), "messages", 1024)


def test_text_format_txt_blocks_equal_text_records_and_every_token_is_learned(sp_dir, tmp_path):
    from clora_ds.data import check_records, detect_format, read_records, tokenize_records

    tok = styled(sp_dir, "none")
    docs = ["The sky is blue.\nGrass is green.", "Snow is white.", "Coal is black and\n  mud is brown."]
    (tmp_path / "general.txt").write_text("\n\n" + docs[0] + "\n\n\n" + docs[1] + "\n \n" + docs[2] + "\n")
    (tmp_path / "general.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    from_txt, from_jsonl = read_records(str(tmp_path / "general.txt")), read_records(str(tmp_path / "general.jsonl"))
    assert from_txt == from_jsonl == [{"text": d} for d in docs]
    assert detect_format({"text": "x"}) == "text" and detect_format({"instruction": "", "output": "", "text": ""}) == "alpaca"
    assert check_records(from_txt, "general.txt", None) == "text"
    a = tokenize_records(from_txt, "general.txt", tok, "auto", 1024).examples
    assert a == tokenize_records(from_jsonl, "general.jsonl", tok, "text", 1024).examples
    for doc, ex in zip(docs, a):
        ids = ex["input_ids"]
        assert ids == [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex["labels"][1:] == ids[1:]  # every token a model can predict (all but the first) carries the loss


@pytest.mark.slow
def test_the_launcher_trains_a_tiny_model_on_chat_data_and_it_answers_in_the_trained_form(sp_dir, tmp_path):
    """A tiny LLaMA with the LLaMA-3 template learns the data's answer form ("Colour: X.") from chat records: the loss
    falls, and a greedy generation from apply_chat_template(..., add_generation_prompt=True) answers in that form."""
    import torch
    from transformers import AutoModelForCausalLM

    from clora_ds.tiny import build_tiny_llama

    tok = styled(sp_dir, "llama3")
    model_dir = tmp_path / "model"
    tok.save_pretrained(str(model_dir))
    model = build_tiny_llama(len(tok), seed=0, initializer_range=0.1)  # as the demo's: an output layer that can answer
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(str(model_dir))
    out = tmp_path / "run"
    run_checked([sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
                 "--model_name_or_path", str(model_dir), "--train_file", str(CHAT), "--output_dir", str(out),
                 "--max_steps", "40", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
                 "--lora_dropout", "0", "--lora_r", "8", "--lora_alpha", "16", "--clora_k", "4", "--max_seq_length",
                 "256", "--logging_steps", "1", "--save_steps", "0", "--seed", "0", "--packing"], timeout=600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["task_loss"] for r in rows if "task_loss" in r]
    assert len(loss) == 40 and sum(loss[-5:]) / 5 < 0.3 * sum(loss[:5]) / 5, loss
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(out / "adapter")).eval()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    colours = {m["content"] for r in chat_records() for m in r["messages"] if m["role"] == "assistant"}
    for question in ("What colour is the sky?", "What colour is a carrot?"):
        messages = [{"role": "system", "content": "You name the colour of things."}, {"role": "user", "content": question}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        answers = []
        for model in (base, trained):
            with torch.no_grad():
                new = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eot, pad_token_id=eot)
            answers.append(tok.decode(new[0, ids.shape[1]:]))
        assert answers[0].removesuffix("<|eot_id|>") not in colours, answers  # the base does not answer so
        assert answers[1].removesuffix("<|eot_id|>") in colours and answers[1].endswith("<|eot_id|>"), answers
