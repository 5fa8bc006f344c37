"""Where on a text the NLL changes: the first tokens after the bos token clora_ds prepends, against the rest.

    python bench/bos_position_nll.py --model assets/smollm2-135m-instruct --text out/pareto/data/text_b.jsonl \
        --adapter out/pareto/s0/lora_lr0.0003/adapter

Each {"text": ...} record is tokenized as clora_ds' text format tokenizes it ([bos] text [eos], clora_ds.data's
tokenize_pieces) and scored by the base and, with --adapter, by base + adapter: the mean NLL of the first --first
predicted tokens and of the rest. On SmolLM2 the bos token is <|im_start|>, which its own tokenizer never puts before
raw text; this says how much of a text-NLL change sits right after it.
"""
import argparse
import json

import torch


def position_nll(model, examples, first: int):
    """(mean NLL of the first ``first`` predicted tokens, of the rest, of all) over ``examples`` (token id lists)."""
    head, rest, n_head, n_rest = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in examples:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            nll = [-logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
            head, n_head = head + sum(nll[:first]), n_head + len(nll[:first])
            rest, n_rest = rest + sum(nll[first:]), n_rest + len(nll[first:])
    return head / n_head, rest / n_rest, (head + rest) / (n_head + n_rest)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the base model directory")
    ap.add_argument("--text", required=True, help="a .jsonl of {\"text\": ...} records")
    ap.add_argument("--adapter", help="a PEFT adapter directory to score beside the base")
    ap.add_argument("--first", type=int, default=2, help="how many tokens after bos count as 'first' (default 2)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clora_ds.data import tokenize_pieces

    tok = AutoTokenizer.from_pretrained(args.model)
    with open(args.text) as f:
        examples = [tokenize_pieces(tok, [(json.loads(line)["text"], True)], 10**6, True)["input_ids"]
                    for line in f if line.strip()]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"bos {tok.bos_token!r}; {len(examples)} texts; NLL (nats/token): first {args.first} | rest | all")
    print("base    " + " | ".join(f"{v:.4f}" for v in position_nll(model, examples, args.first)))
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
        print("adapter " + " | ".join(f"{v:.4f}" for v in position_nll(model, examples, args.first)))


if __name__ == "__main__":
    main()
