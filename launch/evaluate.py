"""Evaluate a base model and CLoRA / LoRA adapters: in-domain accuracy (the paper's protocols), forgetting (lm-eval,
offline) and weight-space metrics, with the base model always beside them.

    python launch/evaluate.py --base_model DIR --adapter [NAME=]DIR --task_file [NAME=]FILE --output_dir EVAL_DIR
    python launch/evaluate.py --run_dir OUT --task_dir dataset/              # a training run: OUT/adapter, its base
    python launch/evaluate.py --sweep_dir out/sweep --task_file boolq=test.json --lm_eval_tasks clora_bbh \\
        --lm_eval_data_dir assets/                                          # every finished run of a k-sweep
    torchrun --nproc_per_node 8 launch/evaluate.py ...                      # data-parallel (or deepspeed --num_gpus 8)

Results: EVAL_DIR/eval_results.json and .md, every prediction in EVAL_DIR/predictions/. Bad input is one `error:`
line and exit status 2, before any model is loaded.
"""
import argparse
import os
import sys
from pathlib import Path

# `python launch/evaluate.py` puts launch/ first on sys.path, where this file would shadow the `evaluate` library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def named(value: str):
    """NAME=PATH, or PATH (named after the file or directory)."""
    name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
    p = Path(path)
    return name or (p.parent.name if p.name in ("test.json", "test.jsonl") else p.stem if p.suffix else p.name), p


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("what to evaluate (the base model is always evaluated too)")
    src.add_argument("--base_model", help="the base model directory")
    src.add_argument("--adapter", action="append", default=[], type=named, metavar="[NAME=]DIR",
                     help="a PEFT LoRA adapter (repeat for several); NAME defaults to the directory's name")
    src.add_argument("--run_dir", type=Path, help="a launch/train.py --output_dir: its adapter and base model")
    src.add_argument("--sweep_dir", type=Path, help="a k-sweep (sweep.sbatch): every finished run in it")
    src.add_argument("--base_adapters", metavar="DIR[,DIR...]",
                     help="earlier PEFT LoRA adapters merged into the base, in order, before anything is evaluated: "
                          "what an adapter trained with launch/train.py --base_adapters was trained on (--run_dir / "
                          "--sweep_dir take the run's own; an adapter whose run recorded them must get the same files)")
    tasks = ap.add_argument_group("in-domain tasks (generation; protocol detected from the records)")
    tasks.add_argument("--task_file", action="append", default=[], type=named, metavar="[NAME=]FILE",
                       help="a test file (.json/.jsonl/.parquet): LLM-Adapters, MetaMath or MATH records")
    tasks.add_argument("--task_dir", type=Path, help="a folder laid out like LLM-Adapters' dataset/: NAME/test.json")
    tasks.add_argument("--limit", type=int, help="evaluate the first N records of each task")
    tasks.add_argument("--max_new_tokens", type=int, help="tokens to generate (default: 32 commonsense, 256-512 math)")
    tasks.add_argument("--batch_size", type=int, default=32, help="prompts per generation batch (default 32)")
    lm = ap.add_argument_group("forgetting: lm-evaluation-harness (pip install 'clora_ds[eval]')")
    lm.add_argument("--lm_eval_tasks", default="", help="comma-separated: clora_mc, clora_bbh, clora_mmlu_pro (local "
                    "files) and lm-eval's own task names (need the hub)")
    lm.add_argument("--lm_eval_data_dir", type=Path, help="holds bbh/ and mmlu_pro/ for clora_bbh / clora_mmlu_pro")
    lm.add_argument("--lm_eval_limit", type=int, help="the first N items of each lm-eval task")
    tasks.add_argument("--loss_file", action="append", default=[], type=named, metavar="[NAME=]FILE",
                       help="held-out text (records with \"text\", or task records): the mean token NLL of each model "
                            "(forgetting of general text)")
    w = ap.add_argument_group("weight-space metrics (adapters only)")
    w.add_argument("--no_weights", action="store_true", help="skip ‖ΔW‖, F and leakage")
    w.add_argument("--f_file", type=Path, help="records whose activations define F (default: the first task file)")
    w.add_argument("--f_records", type=int, default=100, help="records used for F (default 100)")
    w.add_argument("--clora_config", type=Path, help="clora_config.json giving P for adapters without one (plain LoRA)")
    ap.add_argument("--output_dir", type=Path, help="EVAL_DIR (default: RUN_DIR/eval or SWEEP_DIR/eval)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing EVAL_DIR/eval_results.json")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap


def init_distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def main(argv=None):
    args = build_parser().parse_args(argv)
    from clora_ds.distributed import SiblingFailed, exit_now, leave_together
    from clora_ds.errors import UserError
    from clora_ds.evaluation.run import EvalRequest, run_evaluation

    req = EvalRequest(base_model=args.base_model, adapters=list(args.adapter), tasks=list(args.task_file),
                      task_dir=args.task_dir, run_dir=args.run_dir, sweep_dir=args.sweep_dir,
                      output_dir=args.output_dir, limit=args.limit, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, lm_eval_tasks=[t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()],
                      lm_eval_data_dir=args.lm_eval_data_dir, lm_eval_limit=args.lm_eval_limit,
                      weights=not args.no_weights, f_file=args.f_file, f_records=args.f_records,
                      clora_config=args.clora_config, dtype=args.dtype, overwrite=args.overwrite,
                      loss_files=list(args.loss_file), base_adapters=args.base_adapters)
    code = 0
    try:
        init_distributed()
        run_evaluation(req)  # every input is checked before a model loads or a file is written
    except SiblingFailed:  # another rank found the problem and reports it
        code = 2
    except UserError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    if not leave_together():  # the process group could not be closed: leave before the interpreter's shutdown aborts
        exit_now(code or 1)
    if code:
        exit_now(code)


if __name__ == "__main__":
    main()
