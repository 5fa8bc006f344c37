"""Check a SLURM training job on its head node before any rank starts (run by train.sbatch, not by hand).

    python launch/slurm/preflight.py --plan FILE --ranks_per_node G [--expected_nodes N] [--sweep_k "8 16"] \\
        -- TRAIN ARGS

The train arguments are parsed exactly as launch/train.py parses them (clora_ds.arguments.parse_train_arguments) and
checked by the same function (clora_ds.plan.plan_run, inside check_job), for this job's world size. The allocation comes from SLURM_JOB_NUM_NODES,
SLURM_TASKS_PER_NODE, SLURM_GPUS_ON_NODE, SLURM_RESTART_COUNT and SLURM_ARRAY_TASK_ID. FILE receives the run's
output directory (line 1) and the flags the job adds to the train arguments (one per line). A job that cannot
start gets one `error:` message and exit status 2.
"""
import argparse
import os
import sys
from pathlib import Path

from clora_ds.arguments import parse_train_arguments
from clora_ds.errors import UserError
from clora_ds.slurm import JobShape, check_job, job_flags


def env_int(name):
    value = os.environ.get(name, "")
    return int(value) if value.strip() else None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--plan", required=True, help="file to write the output directory and the added flags to")
    cli.add_argument("--ranks_per_node", type=int, required=True, help="ranks started per node (GPUS_PER_NODE)")
    cli.add_argument("--expected_nodes", type=int, help="NODES from the script: the node count it is written for")
    cli.add_argument("--sweep_k", help="space-separated k values when this job is a k-sweep array task")
    args = cli.parse_args(argv[:split])
    train_argv = argv[split + 1:]

    shape = JobShape(nodes=env_int("SLURM_JOB_NUM_NODES") or 1, ranks_per_node=args.ranks_per_node,
                     tasks_per_node=os.environ.get("SLURM_TASKS_PER_NODE", ""),
                     gpus_on_node=env_int("SLURM_GPUS_ON_NODE"), expected_nodes=args.expected_nodes,
                     restart_count=env_int("SLURM_RESTART_COUNT") or 0, array_task_id=env_int("SLURM_ARRAY_TASK_ID"))
    try:
        sweep_k = [int(k) for k in args.sweep_k.split()] if args.sweep_k is not None else None
    except ValueError:
        sys.exit(f"error: SWEEP_K={args.sweep_k!r}: give whole numbers separated by spaces")
    try:
        _, _, clora_args, train = parse_train_arguments(train_argv)
        flags = job_flags(train, clora_args, shape, sweep_k)
        model, data, clora_args, train = parse_train_arguments(train_argv + flags)
        resume = check_job(model, data, clora_args, train, shape)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    out = Path(train.output_dir).resolve()
    Path(args.plan).write_text("\n".join([str(out)] + flags) + "\n")
    print(f"[preflight] {shape.nodes} node(s) x {shape.ranks_per_node} rank(s) = world size {shape.world_size}; "
          f"output {out}; " + (f"resuming from {resume}" if resume else "starting fresh")
          + (f"; added flags: {' '.join(flags)}" if flags else ""), flush=True)


if __name__ == "__main__":
    main()
