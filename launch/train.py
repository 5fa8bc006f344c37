"""Train a CLoRA adapter with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2.json \\
        --model_name_or_path meta-llama/Llama-2-7b-hf --train_file commonsense_170k.json \\
        --output_dir out/clora-k512 --clora_k 512 --lora_r 32 --lora_alpha 64 --bf16
    deepspeed --num_gpus 8 launch/train.py run.yaml --learning_rate 1e-4    # flags override the file
    python launch/train.py ...                                              # one process

Every flag can also come from a YAML/JSON file (first argument, or --config FILE); unknown keys are
errors. `--resume_from_checkpoint auto` continues from the newest complete checkpoint in output_dir.
"""
import os
import sys
from pathlib import Path

from transformers import HfArgumentParser

from clora_ds.arguments import ARGUMENT_CLASSES, validate_arguments


def config_file_to_argv(path: str, parser) -> list:
    import yaml

    p = Path(path)
    if not p.is_file():
        sys.exit(f"error: config file {path} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        sys.exit(f"error: {path} must hold a mapping of argument names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(data) - known)
    if unknown:
        sys.exit(f"error: {path}: unknown keys {unknown}; see `python launch/train.py --help`")
    argv = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        argv += [f"--{key}", str(value)]
    return argv


def parse(argv):
    parser = HfArgumentParser(ARGUMENT_CLASSES, description=__doc__.split("\n\n")[0],
                              epilog="Flags may also be given in a YAML/JSON file: launch/train.py FILE [flags].")
    parser.add_argument("--config", help="YAML/JSON file of flags (same names, without --); flags given here override it.")
    if argv and not argv[0].startswith("-"):
        argv = ["--config"] + argv
    if "--config" in argv:
        i = argv.index("--config")
        argv = config_file_to_argv(argv[i + 1], parser) + argv[:i] + argv[i + 2:]
    *outputs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return outputs[: len(ARGUMENT_CLASSES)]  # the last output is the namespace holding --config


def init_distributed():
    import deepspeed
    import torch

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def user_errors() -> tuple:
    """What a user's input or settings cause: reported as one `error:` line on rank 0, exit status 2."""
    from clora_ds.checkpoint import CheckpointError
    from clora_ds.config import CLoRAConfigError
    from clora_ds.data import DataError
    from clora_ds.engine import ConfigError

    return ConfigError, DataError, CheckpointError, CLoRAConfigError, FileExistsError


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, train_args = parse(argv)
    try:
        validate_arguments(model_args, data_args, train_args)
    except ValueError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    init_distributed()
    from clora_ds.engine import SiblingFailed, rank, train

    try:
        train(model_args, data_args, train_args)
    except SiblingFailed:
        sys.exit(2)
    except user_errors() as err:  # anything else (a library's ValueError too) keeps its traceback
        if rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    # every rank leaves together: a rank that exits while gloo threads of the others are still live can
    # abort at interpreter shutdown ("terminate called without an active exception")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
