"""Print the finished runs of a k-sweep (launch/slurm/sweep.sbatch) as one table.

    python launch/slurm/collect_sweep.py out/sweep

Columns: run, k, λ, final loss (eval loss when evaluated), penalty λ·R, R, steps, wall time (all job attempts), and,
once launch/evaluate.py --sweep_dir (or eval.sbatch) has run, in-domain accuracy, lm-eval average (change from the
base model), F and subspace leakage; adapter path. Runs without a final adapter yet are listed below the table. Exit status 1 when no run has finished.
"""
import argparse
import sys

from clora_ds.sweep import collect_sweep, format_sweep_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="the --output_dir given to sweep.sbatch (holds k*/ and lora/)")
    args = parser.parse_args(argv)
    try:
        finished, pending, base = collect_sweep(args.sweep_dir)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    if finished:
        print(format_sweep_table(finished, base))
    for name, why in pending:
        print(f"not finished: {name}: {why}")
    if not finished:
        print(f"no finished runs under {args.sweep_dir}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
