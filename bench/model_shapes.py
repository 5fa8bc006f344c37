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
