"""The model-size flags the benchmarks share: a small CPU LLaMA by default, --llama2_7b for LLaMA-2-7B shapes."""

LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)


def add_shape_args(ap) -> None:
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=0, help="model vocabulary (default: the tokenizer's)")
    ap.add_argument("--llama2_7b", action="store_true", help="hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000")
    ap.add_argument("--bf16", action="store_true")


def apply_shapes(args) -> None:
    if args.llama2_7b:
        for key, value in LLAMA2_7B.items():
            setattr(args, key, value)


def save_random_llama(model_dir, texts, args) -> None:
    """A sentencepiece tokenizer (300 pieces) trained on ``texts`` and a random-init LLaMA of the shape flags, saved
    in model_dir: built on the GPU when there is one, in bf16 with --bf16 (a 7B checkpoint is then 13.5 GB, not 27)."""
    import torch

    from clora_ds.tiny import build_tiny_llama, train_tokenizer

    tok = train_tokenizer(texts, model_dir, vocab_size=300)
    # the model's vocabulary may be larger than the tokenizer's (7B shapes: 32000); ids stay < len(tok)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = build_tiny_llama(max(args.vocab, len(tok)), hidden_size=args.hidden, intermediate_size=args.intermediate,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    if args.bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(model_dir))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
