"""launch/slurm/*.sbatch on a real two-node SLURM cluster built on this machine (tests/slurm_cluster/cluster.sh).

slurmctld runs on the host, one slurmd in each of two network namespaces (nodes clora-n1, clora-n2, interface
clora0 on bridge clorabr0), munge authenticates. Jobs are the real scripts with the real launcher on the tiny LLaMA,
one CPU rank per node; nothing is mocked. These tests need root and Debian's slurm-wlm + munge (.ci/run installs
them); elsewhere they skip and say why. The first tests need no cluster: the job checks and the sweep table.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clora_ds.arguments import parse_train_arguments
from clora_ds.errors import ConfigError
from clora_ds.slurm import JobShape, check_job, expand_tasks_per_node, job_flags
from clora_ds.sweep import collect_sweep, format_sweep_table
from conftest import DATA, ROOT, child_env, run_checked
from test_train import losses, train_args

CLUSTER = ROOT / "tests" / "slurm_cluster" / "cluster.sh"
TRAIN_SBATCH = str(ROOT / "launch" / "slurm" / "train.sbatch")
SWEEP_SBATCH = str(ROOT / "launch" / "slurm" / "sweep.sbatch")
EVAL_SBATCH = str(ROOT / "launch" / "slurm" / "eval.sbatch")
CONVERTER = ROOT / "launch" / "convert_to_peft.py"
# the adapter the job publishes: converted from the last checkpoint once the converter exists, else the launcher's
ADAPTER = "peft_adapter" if CONVERTER.is_file() else "adapter"
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]  # GPU defaults overridden for CPU "nodes"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
RUN = dict(max_steps=30, save_steps=3, per_device_train_batch_size=2)  # 2 ranks x 2 = the global batch of 4


# ------------------------------------------------------------------------------------------------------------
# without a cluster: what the job decides and refuses, and the sweep table
# ------------------------------------------------------------------------------------------------------------
def parsed(model_dir, out, **over):
    """(model, data, clora, train) arguments exactly as launch/train.py and the preflight parse them."""
    return parse_train_arguments(train_args(model_dir, out, **over))


def test_tasks_per_node_expands():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8] and expand_tasks_per_node("") == []
    with pytest.raises(ConfigError, match="cannot read SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node("2(x")


def test_job_flags_pick_the_sweep_run_and_resume_on_requeue(tiny_model_dir, tmp_path):
    _, _, clora, train = parsed(tiny_model_dir, tmp_path / "sweep")
    shape = JobShape(nodes=1, ranks_per_node=1, array_task_id=1)
    assert job_flags(train, clora, shape, [4, 8]) == ["--output_dir", str(tmp_path / "sweep" / "k8"), "--clora_k", "8"]
    assert job_flags(train, clora, JobShape(1, 1, array_task_id=2), [4, 8]) == [
        "--output_dir", str(tmp_path / "sweep" / "lora"), "--clora_k", "4", "--clora_lambda", "0"]
    with pytest.raises(ConfigError, match=r"array task 3 has no sweep run: the sweep has 3 runs \(k4, k8, lora\); "
                                          r"submit with --array=0-2"):
        job_flags(train, clora, JobShape(1, 1, array_task_id=3), [4, 8])
    with pytest.raises(ConfigError, match="not a job array"):
        job_flags(train, clora, JobShape(1, 1), [4, 8])
    assert job_flags(train, clora, JobShape(1, 1, restart_count=1)) == ["--resume_from_checkpoint", "auto"]
    assert job_flags(train, clora, JobShape(1, 1)) == []


def test_check_job_lists_every_reason_before_launch(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "COMPLETE").write_text("2\n")
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"step": 2, "global_batch": 4}))
    model, data, clora, train = parsed(tiny_model_dir, out, per_device_train_batch_size=2)
    bad_shape = JobShape(nodes=1, ranks_per_node=1, tasks_per_node="2", expected_nodes=2)
    with pytest.raises(ConfigError) as err:
        check_job(model, data, clora, train, bad_shape)
    msg = str(err.value)
    assert msg.startswith("this job cannot start:")
    assert "sbatch gave 1 node(s) but the script expects NODES=2; submit with sbatch --nodes=2" in msg
    assert "SLURM allocated 2 tasks per node but the script starts 1 rank(s) on every node" in msg
    assert f"--output_dir {out} holds another run (checkpoint-2)" in msg
    # a resumed run must keep its global batch: 2 per device x 1 rank is not the checkpoint's 4; the preflight also
    # opens the checkpoint's rank files (this one has none) before any rank would load them
    model, data, clora, train = parsed(tiny_model_dir, out, per_device_train_batch_size=2, resume_from_checkpoint="auto")
    with pytest.raises(ConfigError) as err:
        check_job(model, data, clora, train, JobShape(nodes=1, ranks_per_node=1, tasks_per_node="1"))
    msg = str(err.value)
    assert re.search(r"was trained with a global batch of 4; .* = 2; resubmit with --nodes=2", msg), msg
    assert f"cannot resume: {out / 'checkpoint-2'} is not a DeepSpeed checkpoint" in msg
    # λ < 0, k = 0 and a misspelled p_init are refused before launch, like the launcher refuses them
    model, data, clora, train = parsed(tiny_model_dir, tmp_path / "new", clora_lambda=-1, clora_k=0, clora_p_init="orthgonal")
    with pytest.raises(ConfigError) as err:
        check_job(model, data, clora, train, JobShape(nodes=1, ranks_per_node=1, tasks_per_node="1"))
    for needle in ("--clora_lambda (λ) must be a finite number >= 0", "--clora_k must be a positive integer, got 0",
                   "--clora_p_init 'orthgonal' is not one of orthogonal, svd_major, svd_minor, activations"):
        assert needle in str(err.value)
    assert not (tmp_path / "new").exists()


def test_sweep_table_reads_finished_runs(tmp_path):
    def run(name, k, lam, rows, attempts, adapter="adapter"):
        d = tmp_path / name
        d.mkdir()
        (d / "train_config.json").write_text(json.dumps({"arguments": {"clora_k": k, "clora_lambda": lam}}))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "slurm_attempts.jsonl").write_text("".join(json.dumps({"start": s, "end": e}) + "\n" for s, e in attempts))
        if adapter:
            (d / adapter).mkdir()
            (d / adapter / "adapter_config.json").write_text("{}")

    row = lambda step, loss, r, lam=1.0: {"step": step, "task_loss": loss, "penalty": lam * r, "R": r}  # noqa: E731
    run("k16", 16, 1.0, [row(1, 3.0, 0.5), row(2, 2.5, 0.25)], [(0, 100)])
    # a preempted run re-logs step 2 after resuming: the last line wins; wall time sums both attempts
    run("k4", 4, 1.0, [row(1, 3.0, 0.5), row(2, 9.9, 9.9), row(2, 2.0, 0.125)], [(0, 50), (100, 3700)], adapter="peft_adapter")
    run("lora", 4, 0.0, [row(1, 3.0, 0.0, 0.0), row(2, 1.5, 0.0, 0.0)], [(0, 10)])
    run("k64", 64, 1.0, [row(1, 3.0, 0.5)], [], adapter=None)
    finished, pending, base = collect_sweep(tmp_path)
    assert [r.name for r in finished] == ["k4", "k16", "lora"] and base is None
    assert pending == [("k64", "no final adapter yet (running, queued, stopped or failed: see its slurm-*.out)")]
    lines = format_sweep_table(finished).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["run", "k", "λ", "final loss", "penalty λ·R", "R", "steps", "wall time", "adapter"]
    assert cells[2] == ["k4", "4", "1", "2.0000", "0.125", "0.125", "2", "1:00:50", str(tmp_path / "k4" / "peft_adapter")]
    assert cells[3][:8] == ["k16", "16", "1", "2.5000", "0.25", "0.25", "2", "0:01:40"]
    assert cells[4][:8] == ["lora", "-", "0", "1.5000", "0", "0", "2", "0:00:10"]
    # once launch/evaluate.py --sweep_dir has written ROOT/eval/eval_results.json, its columns join the table
    (tmp_path / "eval").mkdir()
    entry = lambda acc, lm, f, leak: {"tasks": {"t": {"accuracy": acc, "n": 10}}, "lm_eval": {"bbh": {"exact_match": lm}},  # noqa: E731
                                      "weights": {"F": f, "leakage_in": leak}}
    (tmp_path / "eval" / "eval_results.json").write_text(json.dumps({"models": {
        "base": {"tasks": {"t": {"accuracy": 0.1, "n": 10}}, "lm_eval": {"bbh": {"exact_match": 0.4}}, "weights": None},
        "k4": entry(0.8, 0.38, 0.2, 0.01), "lora": entry(0.7, 0.3, 0.5, 0.4)}}))
    finished, _, base = collect_sweep(tmp_path)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in format_sweep_table(finished, base).splitlines()[:5]]
    assert cells[0][8:12] == ["in-domain acc", "lm-eval (Δ base)", "F", "leakage_in"]
    assert cells[2][8:12] == ["80.00", "38.00 (-2.00)", "0.2", "0.01"] and cells[3][8:12] == ["-", "-", "-", "-"]
    assert cells[4][8:12] == ["70.00", "30.00 (-10.00)", "0.5", "0.4"]


# ------------------------------------------------------------------------------------------------------------
# the two-node cluster
# ------------------------------------------------------------------------------------------------------------
def _cluster_missing():
    if os.geteuid() != 0:
        return "needs root (network namespaces, SLURM daemons); CI runs it as root"
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "nsenter", "ip") if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not installed: apt-get install -y --no-install-recommends slurm-wlm munge"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Environment for sbatch/scontrol and the jobs; the cluster is torn down afterwards, whatever happens."""
    why = _cluster_missing()
    if why and os.environ.get("CI") == "true":  # .ci/run runs as root and installs them: never skip silently there
        pytest.fail(f"the SLURM cluster tests cannot run in CI: {why}")
    if why:
        pytest.skip(f"no two-node SLURM cluster can be built here: {why}")
    state = "/tmp/clora-slurm-test"
    try:
        up = subprocess.run(["bash", str(CLUSTER), "up", state], capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        env = {**child_env(), "SLURM_CONF": f"{state}/slurm.conf", "GLOO_SOCKET_IFNAME": "clora0", "PYTHON": sys.executable}
        for var in ("NODES", "GPUS_PER_NODE", "SWEEP_K", "CLORA_DS_ROOT", "CLORA_SWEEP_K", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        yield {"env": env, "submit_dir": tmp_path_factory.mktemp("submit"), "state": Path(state)}
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", state], capture_output=True, text=True, timeout=180)


def sbatch(cluster, script, args, *options, env=None):
    """Submit from a scratch directory (where pre-launch errors land), by absolute path: the script finds the checkout."""
    cmd = ["sbatch", "--parsable", *options, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cluster["submit_dir"],
                          env={**cluster["env"], **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def scontrol(cluster, *args):
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, env=cluster["env"])


def job_records(cluster, job):
    """[{field: value}] from `scontrol show job -o` (one record per array task)."""
    text = scontrol(cluster, "show", "job", "-o", job).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]


def wait_for(predicate, timeout, what, diagnose=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diagnose()}")


def wait_job(cluster, job, tasks=1, timeout=420):
    def done():
        recs = job_records(cluster, job)
        return recs if len(recs) == tasks and all(r.get("JobState") in FINAL_STATES for r in recs) else None

    return wait_for(done, timeout, f"job {job}", lambda: scontrol(cluster, "show", "job", job).stdout + cluster_logs(cluster))


def cluster_logs(cluster):
    return "".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]) + "\n"
                   for p in sorted((cluster["state"] / "log").glob("*.log")))


def _attempts_text(out):
    path = Path(out) / "slurm_attempts.jsonl"
    return path.read_text() if path.is_file() else ""


def job_log(out, job):
    path = Path(out) / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def assert_completed(cluster, job, out, tasks=1):
    for rec in wait_job(cluster, job, tasks):
        state = {k: rec.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime", "BatchHost", "NodeList")}
        assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), (
            f"{state}\n--- job log\n{job_log(out, rec['JobId'])[-6000:]}\n--- submit-dir log\n"
            f"{job_log(cluster['submit_dir'], rec['JobId'])[-2000:]}\n--- cluster logs\n{cluster_logs(cluster)}")


def job_args(model_dir, out, **over):
    return train_args(model_dir, out, **{**RUN, **over})


def peft_check(model_dir, adapter, tmp_path):
    """Load the adapter with plain PEFT in a process that never imports clora_ds; return (lora tensors, Δlogits)."""
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
ids = torch.arange(3, 40)[None]
with torch.no_grad():
    tuned = model(input_ids=ids).logits
    with model.disable_adapter():
        plain = model(input_ids=ids).logits
assert not any(m.startswith('clora_ds') for m in sys.modules)
print('LORA', sum('lora_' in n for n, _ in model.named_parameters()), 'DIFF', (tuned - plain).abs().max().item())
"""
    proc = run_checked([sys.executable, "-c", code], timeout=600)
    n, diff = re.search(r"LORA (\d+) DIFF (\S+)", proc.stdout).groups()
    return int(n), float(diff)


@pytest.fixture(scope="module")
def two_node_run(cluster, tiny_model_dir, tmp_path_factory):
    """One uninterrupted 2-node job: the first test's subject and the preemption test's reference."""
    out = tmp_path_factory.mktemp("two_node") / "run"
    job = sbatch(cluster, TRAIN_SBATCH, job_args(tiny_model_dir, out), "--nodes=2", *CPU_JOB)
    assert_completed(cluster, job, out)
    return out, job


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_job_trains_across_both_nodes(cluster, two_node_run, tiny_model_dir, tmp_path):
    out, job = two_node_run
    log = job_log(out, job)
    assert "2 node(s) (clora-n[1-2]) x 1 rank(s) = world size 2; rendezvous 10.213.0.11:" in log
    assert "rank 0 of 2 (local rank 0 of 1) on node clora-n1" in log and "rank 1 of 2 (local rank 0 of 1) on node clora-n2" in log
    assert "world size 2; ZeRO stage 2" in log  # the launcher's own view of the process group
    assert "network settings passed to every rank: GLOO_SOCKET_IFNAME=clora0" in log
    assert f"log: {out}/slurm-{job}.out" in (cluster["submit_dir"] / f"slurm-{job}.out").read_text()
    assert sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/COMPLETE")) == list(range(3, 31, 3))
    assert len(losses(out)) == 30
    attempts = [json.loads(l) for l in (out / "slurm_attempts.jsonl").read_text().splitlines()]
    assert [(a["state"], a["world_size"], a["nodes"]) for a in attempts] == [("completed", 2, 2)]
    n_lora, diff = peft_check(tiny_model_dir, out / ADAPTER, tmp_path)
    assert n_lora == 2 * 5 * 2  # 2 layers x (q, k, v, up, down) x (A, B)
    assert diff > 1e-4, "the trained adapter must change the logits"
    if ADAPTER == "peft_adapter":  # the converted last checkpoint == the launcher's final adapter
        assert f"converting {out}/checkpoint-30 -> {out}/peft_adapter" in log
        mine, theirs = (load_file(str(out / d / "adapter_model.safetensors")) for d in ("peft_adapter", "adapter"))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    else:
        assert "launch/convert_to_peft.py is not in this checkout" in log


@pytest.mark.slow
@pytest.mark.slurm
def test_requeued_job_resumes_and_ends_with_the_uninterrupted_adapter(cluster, two_node_run, tiny_model_dir, tmp_path):
    ref, _ = two_node_run
    out = tmp_path / "run"
    job = sbatch(cluster, TRAIN_SBATCH, job_args(tiny_model_dir, out), "--nodes=2", *CPU_JOB)
    wait_for(lambda: (out / "checkpoint-3" / "COMPLETE").is_file(), 300, "the first checkpoint",
             lambda: job_log(out, job)[-4000:] + cluster_logs(cluster))
    requeue = scontrol(cluster, "requeue", job)
    requeued_at = time.time()
    assert requeue.returncode == 0, requeue.stderr
    # SLURM holds a requeued job for ~2 minutes before it may start again; let it start sooner, but only once the
    # first attempt has ended and a later second has begun: slurmd revokes the killed attempt's credential, and a
    # relaunch whose credential carries the same second is refused ("Job credential revoked"; seen in CI)
    wait_for(lambda: job_records(cluster, job)[0].get("JobState") == "PENDING", 120, "the requeued job to be pending")
    wait_for(lambda: '"state": "stopped"' in _attempts_text(out), 60, "the first attempt to end")
    time.sleep(max(0.0, requeued_at + 2.0 - time.time()))
    assert scontrol(cluster, "update", f"JobId={job}", "StartTime=now").returncode == 0
    assert_completed(cluster, job, out)

    log = job_log(out, job)
    stop = re.search(r"SIGTERM: the job is being stopped .* Newest complete checkpoint: (\S+); a requeued", log)
    assert stop, log[-6000:]
    step = int(stop.group(1).rsplit("-", 1)[1])
    assert 3 <= step < 30 and "[clora_ds] done" not in log[:stop.start()], "the requeue must land mid-run"
    assert "attempt 2:" in log and "--resume_from_checkpoint auto" in log  # both attempts in one log
    assert f"resumed from {out}/checkpoint-{step} at step {step}" in log
    attempts = [json.loads(l) for l in (out / "slurm_attempts.jsonl").read_text().splitlines()]
    assert [(a["restart"], a["state"]) for a in attempts] == [(0, "stopped"), (1, "completed")]
    got, want = losses(out), losses(ref)
    assert len(got) == 30 and max(abs(a - b) for a, b in zip(got, want)) <= 1e-6, (got, want)
    mine, theirs = (load_file(str(d / ADAPTER / "adapter_model.safetensors")) for d in (out, ref))
    assert mine.keys() == theirs.keys() and len(mine) == 20
    worst = max((mine[k].float() - theirs[k].float()).abs().max().item() for k in mine)
    assert all(t.dtype == torch.float32 for t in mine.values()) and worst <= 1e-6, worst


@pytest.mark.slow
@pytest.mark.slurm
def test_sweep_array_runs_k_values_and_lora_baseline(cluster, tiny_model_dir, tmp_path):
    root = tmp_path / "sweep"
    args = job_args(tiny_model_dir, root, max_steps=4, save_steps=0, per_device_train_batch_size=4)
    job = sbatch(cluster, SWEEP_SBATCH, args, "--array=0-2", "--nodes=1", *CPU_JOB, env={"SWEEP_K": "4 8"})
    for rec in wait_job(cluster, job, tasks=3):
        name = ["k4", "k8", "lora"][int(rec["ArrayTaskId"])]
        assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), job_log(root / name, rec["JobId"])[-6000:]
    table = run_checked([sys.executable, str(ROOT / "launch" / "slurm" / "collect_sweep.py"), str(root)]).stdout
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    assert set(rows) == {"k4", "k8", "lora"}, table
    for name, k, lam in (("k4", "4", "1"), ("k8", "8", "1"), ("lora", "-", "0")):
        run, k_, lam_, loss, penalty, _, steps, wall, adapter = rows[name]
        assert (k_, lam_, steps) == (k, lam, "4") and float(loss) > 0 and wall != "-", table
        assert adapter == str(root / name / ADAPTER) and (Path(adapter) / "adapter_model.safetensors").is_file()
        assert (float(penalty) == 0) == (name == "lora"), table
    config = json.loads((root / "lora" / "train_config.json").read_text())["arguments"]
    assert (config["clora_lambda"], config["clora_k"]) == (0.0, 4)
    # the evaluation as the sweep's last step: eval.sbatch after the array, by dependency
    test_file = root / "test.jsonl"
    test_file.write_text((DATA / "commonsense_tiny.jsonl").read_text())
    evaluation = sbatch(cluster, EVAL_SBATCH, ["--sweep_dir", root, "--task_file", f"facts={test_file}", "--limit", "6"],
                        f"--dependency=afterany:{job}", "--nodes=1", *CPU_JOB)
    for rec in wait_job(cluster, evaluation):
        assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), job_log(cluster["submit_dir"], rec["JobId"])[-6000:]
    results = json.loads((root / "eval" / "eval_results.json").read_text())
    assert list(results["models"]) == ["base", "k4", "k8", "lora"]
    assert all(results["models"][n]["tasks"]["facts"]["n"] == 6 for n in results["models"])
    assert (root / "eval" / "eval_vs_k.png").stat().st_size > 1000
    table = run_checked([sys.executable, str(ROOT / "launch" / "slurm" / "collect_sweep.py"), str(root)]).stdout
    assert "in-domain acc" in table and "leakage_in" in table, table


@pytest.mark.slow
@pytest.mark.slurm
def test_bad_use_is_refused_before_anything_is_launched(cluster, two_node_run, tiny_model_dir, tmp_path):
    ref, _ = two_node_run
    before = sorted(p.name for p in ref.rglob("*"))
    fresh = tmp_path / "fresh"
    one, two = ["--nodes=1", *CPU_JOB], ["--nodes=2", *CPU_JOB]
    cases = {  # name: (sbatch options, env, train args, expected message)
        "no_args": (one, {}, [], "no training arguments. Usage: sbatch --nodes=N launch/slurm/train.sbatch"),
        "nodes_vs_NODES": (one, {"NODES": "2"}, job_args(tiny_model_dir, fresh),
                           "sbatch gave 1 node(s) but the script expects NODES=2; submit with sbatch --nodes=2"),
        "tasks_vs_gpus": (two + ["--ntasks-per-node=2"], {"GPUS_PER_NODE": "1"}, job_args(tiny_model_dir, fresh),
                          "SLURM allocated 2(x2) tasks per node but the script starts 1 rank(s) on every node"),
        "another_run": (two, {}, job_args(tiny_model_dir, ref),
                        f"--output_dir {ref} holds another run (adapter, checkpoint-"),
        "resume_on_fewer_nodes": (one, {}, job_args(tiny_model_dir, ref, resume_from_checkpoint="auto"),
                                  "was trained with a global batch of 4; this job's is 2 per device x 1 rank(s) (1 node(s) "
                                  "x 1) x 1 accumulation = 2; resubmit with --nodes=2"),
    }
    jobs = {name: sbatch(cluster, TRAIN_SBATCH, args, *options, env=env) for name, (options, env, args, _) in cases.items()}
    for name, job in jobs.items():
        (rec,) = wait_job(cluster, job)
        text = (cluster["submit_dir"] / f"slurm-{job}.out").read_text()
        assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "2:0"), (name, rec, text)
        assert len([l for l in text.splitlines() if l.startswith("error:")]) == 1 and "Traceback" not in text, (name, text)
        assert cases[name][3] in text, (name, text)
        assert "rank 0 of" not in text and "log:" not in text, (name, text)  # no srun, no log redirect
    assert not fresh.exists()
    assert sorted(p.name for p in ref.rglob("*")) == before  # the other run is untouched
