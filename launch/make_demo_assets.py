"""Build the CPU demo's assets: a tiny LLaMA, a sentencepiece tokenizer and a small commonsense-format task.

    python launch/make_demo_assets.py out/demo/assets     # -> assets/model, assets/data/{train,test}.jsonl

Nothing is downloaded. Skips the work when the assets are already there. The task: which of 20 words are fruits,
asked as boolq (true/false) and winogrande (option1/option2) ask; the test split holds 6 words' questions, whose
option form was never trained (clora_ds.tiny.fact_splits).
"""
import argparse
from pathlib import Path

from clora_ds.tiny import make_demo_assets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="where to write model/ and data/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.directory)
    if all((root / p).is_file() for p in ("model/config.json", "data/train.jsonl", "data/test.jsonl")):
        print(f"demo assets already in {root}")
        return
    paths = make_demo_assets(root, seed=args.seed)
    print(f"demo assets: model {paths['model']}, data {paths['train']} and {paths['test']}")


if __name__ == "__main__":
    main()
