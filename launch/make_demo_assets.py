"""Build the embedded default for the CPU demo: a tiny LLaMA, a sentencepiece tokenizer and sample data.

    python launch/make_demo_assets.py out/demo/assets     # -> assets/model, assets/data/train.jsonl

Nothing is downloaded. Skips the work when the assets are already there.
"""
import argparse
from pathlib import Path

from clora_ds.tiny import make_tiny_assets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="where to write model/ and data/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records", type=int, default=512, help="sample records to write")
    args = parser.parse_args()
    root = Path(args.directory)
    if (root / "model" / "config.json").is_file() and (root / "data" / "train.jsonl").is_file():
        print(f"demo assets already in {root}")
        return
    paths = make_tiny_assets(root, seed=args.seed, n_records=args.records)
    print(f"demo assets: model {paths['model']}, data {paths['data']}")


if __name__ == "__main__":
    main()
