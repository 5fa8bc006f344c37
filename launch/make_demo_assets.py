"""Build the CPU demo's assets: a tiny LLaMA, a sentencepiece tokenizer and a small commonsense-format task.

    python launch/make_demo_assets.py out/demo/assets     # -> assets/model, assets/data/{train,test}.jsonl

Nothing is downloaded. Skips the work when this task's assets are already there. The task: which of 20 words are fruits,
asked as boolq (true/false) and winogrande (option1/option2) ask; training asks every fact in 8 wordings of each form,
the test split asks the same facts in 2 wordings never trained, 80 questions (clora_ds.tiny.demo_splits).
"""
import argparse
import json
from pathlib import Path

from clora_ds.tiny import demo_splits, make_demo_assets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="where to write model/ and data/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.directory)
    expected = {f"data/{name}.jsonl": "".join(json.dumps(r) + "\n" for r in records)
                for name, records in zip(("train", "test"), demo_splits())}
    # assets of an older demo (another task) are rebuilt, not reused: the demo's figure is for this task
    if (root / "model" / "config.json").is_file() and all(
            (root / p).is_file() and (root / p).read_text() == text for p, text in expected.items()):
        print(f"demo assets already in {root}")
        return
    paths = make_demo_assets(root, seed=args.seed, splits=demo_splits)
    print(f"demo assets: model {paths['model']}, data {paths['train']} and {paths['test']}")


if __name__ == "__main__":
    main()
