"""Train a CLoRA adapter with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2.json \\
        --model_name_or_path meta-llama/Llama-2-7b-hf --train_file commonsense_170k.json \\
        --output_dir out/clora-k512 --clora_k 512 --lora_r 32 --lora_alpha 64 --bf16
    deepspeed --num_gpus 8 launch/train.py run.yaml --learning_rate 1e-4    # flags override the file
    python launch/train.py ...                                              # one process

Every flag can also come from a YAML/JSON file (first argument, or --config FILE); unknown keys are
errors. `--resume_from_checkpoint auto` continues from the newest complete checkpoint in output_dir.
Bad input is one `error:` line and exit status 2, and nothing in output_dir is created, cleared or written.
"""
import os
import sys
import traceback


def init_distributed():
    import deepspeed
    import torch

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def leave(code: int, wait_s: float = None) -> None:
    """Every way out of a run, success and error alike: every rank at one barrier (waiting at most ``wait_s``;
    default LEAVE_TIMEOUT_S), the process group destroyed, then exit status ``code`` (0: return normally)."""
    from clora_ds.distributed import LEAVE_TIMEOUT_S, exit_now, leave_together

    if not leave_together(LEAVE_TIMEOUT_S if wait_s is None else wait_s):
        # the other ranks never reached the barrier (an error only this rank saw): the process group cannot be closed
        # and the interpreter's shutdown could abort in its threads, so leave at once; the launcher stops the others
        exit_now(code or 1)
    if code:
        exit_now(code)


def fail(err, rank=None) -> None:
    if (rank if rank is not None else int(os.environ.get("RANK", "0"))) == 0:
        print(f"error: {err}", file=sys.stderr, flush=True)
    leave(2)


def main(argv=None):
    from clora_ds.arguments import parse_train_arguments, validate_arguments
    from clora_ds.distributed import default_signal_actions, stop_with_launcher
    from clora_ds.errors import UserError

    default_signal_actions()
    stop_with_launcher()
    try:
        groups = parse_train_arguments(sys.argv[1:] if argv is None else argv, description=__doc__.split("\n\n")[0])
        validate_arguments(*groups)
    except UserError as err:
        fail(err)
    init_distributed()
    from clora_ds.distributed import SiblingFailed, rank
    from clora_ds.engine import train

    try:
        train(*groups)
    except SiblingFailed:  # another rank reports the error; this one leaves with it
        leave(2)
    except UserError as err:
        fail(err, rank())
    except Exception:  # a bug or a library's own failure: its traceback, then the same way out as every other exit
        traceback.print_exc()
        leave(1, wait_s=10)  # the other ranks are likely stuck in a collective: do not hold the traceback for minutes
    leave(0)


if __name__ == "__main__":
    main()
