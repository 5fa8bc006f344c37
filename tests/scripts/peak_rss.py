"""Run a command and print its peak resident memory (bytes) as the last line of stdout; exit with its status.

    python tests/scripts/peak_rss.py python launch/convert_to_peft.py CKPT OUT

Measured from a fresh, small process on purpose: Linux carries a parent's memory high-water mark into a
forked child's ru_maxrss (it is recorded at exec), so a child of a large process (pytest, a benchmark
holding a model) would report at least its parent's peak. Here the parent is this ~10 MB interpreter.
"""
import os
import subprocess
import sys

if __name__ == "__main__":
    proc = subprocess.Popen(sys.argv[1:])
    _, status, usage = os.wait4(proc.pid, 0)
    print(usage.ru_maxrss * 1024, flush=True)  # Linux reports KiB
    sys.exit(os.waitstatus_to_exitcode(status))
