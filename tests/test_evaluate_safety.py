"""launch/evaluate.py and launch/prepare_assets.py refuse bad input before anything loads or is written: exit 2, one
`error:` line naming the flag or file (the problems it lists follow on indented lines), no traceback, the files as
they were.

"Nothing loaded" is shown by its effect: the base model here is a tripwire, a copy of the tiny model whose config.json
says intermediate_size is 8 wider than its weights. Every check passes on it (config, tokenizer, safetensors headers),
but loading it raises transformers' size-mismatch error with a traceback (the control case proves it), so a clean
exit 2 means the request was refused before any load was tried.
"""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import DATA, ROOT, child_env, tree_hash

EVALUATE = str(ROOT / "launch" / "evaluate.py")
PREPARE = str(ROOT / "launch" / "prepare_assets.py")


def write_lora_adapter(out, hidden=40, r=2):
    """A PEFT LoRA adapter on the tiny model's q_proj of layer 0, in PEFT's own file layout (what it saves)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": ["q_proj"], "layers_to_transform": [0], "bias": "none"}))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.randn(r, hidden), f"{key}.lora_B.weight": torch.randn(hidden, r)},
              str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_safety")
    trip = root / "trip"
    shutil.copytree(tiny_model_dir, trip)
    config = json.loads((trip / "config.json").read_text())
    config["intermediate_size"] += 8
    (trip / "config.json").write_text(json.dumps(config))
    records = [json.loads(line) for line in (DATA / "commonsense_tiny.jsonl").read_text().splitlines()]
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    third = root / "third.jsonl"  # the layout is told by record 1; record 3 lacks what the prompt is made of
    third.write_text("".join(json.dumps({k: v for k, v in r.items() if i != 2 or k != "instruction"}) + "\n"
                             for i, r in enumerate(records[:6])))
    adapter = write_lora_adapter(root / "adapter")
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(adapter / "adapter_config.json", broken)
    (broken / "adapter_model.safetensors").write_text("not a safetensors file\n")
    # a training run made from ROOT/project with relative paths (--model_name_or_path models/tiny)
    project = root / "project"
    shutil.copytree(trip, project / "models" / "tiny")
    run = project / "runs" / "r1"
    shutil.copytree(adapter, run / "adapter")
    (run / "train_config.json").write_text(json.dumps({"arguments": {"model_name_or_path": "models/tiny",
                                                                     "output_dir": "runs/r1"}}))
    (root / "a_file").write_text("x\n")
    (root / "dataset" / "boolq").mkdir(parents=True)  # a dataset/ folder with a train split and no test.json
    (root / "dataset" / "boolq" / "train.json").write_text("[]")
    return {"root": root, "trip": trip, "good": good, "third": third, "adapter": adapter, "broken": broken,
            "project": project, "run": run, "file": root / "a_file", "out": root / "out"}


def case_args(name, w):
    """(arguments, what the error must say) of each class of bad input; one run may list several problems."""
    base = ["--base_model", w["trip"], "--output_dir", w["out"]]
    task = ["--task_file", f"good={w['good']}"]
    gone = w["root"] / "missing"
    return {
        "counts": (base + task + ["--batch_size", "0", "--f_records", "-1", "--lm_eval_limit", "0",
                                  "--max_new_tokens", "0", "--limit", "-2"],
                   ["--batch_size must be >= 1, got 0", "--f_records must be >= 1, got -1",
                    "--lm_eval_limit must be >= 1, got 0", "--max_new_tokens must be >= 1, got 0",
                    "--limit must be >= 1, got -2"]),
        "paths_that_do_not_exist": (
            base + task + ["--task_dir", gone / "dataset", "--adapter", f"gone={gone / 'adapter'}", "--f_file",
                           gone / "f.jsonl", "--clora_config", gone / "c.json", "--lm_eval_data_dir", gone / "assets",
                           "--run_dir", gone / "run"],
            [f"--task_dir {gone / 'dataset'} does not exist", f"--adapter gone: {gone / 'adapter'} does not exist",
             f"--f_file {gone / 'f.jsonl'} does not exist", f"--clora_config {gone / 'c.json'} does not exist",
             f"--lm_eval_data_dir {gone / 'assets'} does not exist", f"--run_dir {gone / 'run'} does not exist"]),
        "paths_of_the_wrong_kind": (
            ["--base_model", w["trip"], "--output_dir", w["file"], "--task_dir", w["file"], "--f_file", w["root"],
             "--sweep_dir", w["file"]] + task,
            [f"--output_dir {w['file']} is a file; expected a directory",
             f"--task_dir {w['file']} is a file; expected a folder laid out like LLM-Adapters'",
             f"--f_file {w['root']} is a directory; expected a file", f"--sweep_dir {w['file']} is a file"]),
        "contents": (
            base + ["--task_dir", w["root"] / "dataset", "--task_file", f"third={w['third']}", "--adapter",
                    f"broken={w['broken']}", "--sweep_dir", gone / "sweep"],
            [f"--task_dir {w['root'] / 'dataset'} holds no NAME/test.json",
             f"--task_file third: {w['third']}: record 3 has no 'instruction'",
             f"--adapter broken: {w['broken'] / 'adapter_model.safetensors'} is not a readable safetensors file",
             f"--sweep_dir {gone / 'sweep'} does not exist"]),
        "run_base_recorded_relative": (["--run_dir", w["run"]] + task,
                                       [f"models/tiny (train_config.json) was recorded relative to {w['project']}; "
                                        "run from there or pass --base_model"]),
        "lm_eval_task_does_not_exist": (base + task + ["--lm_eval_tasks", "clora_mc,no_such_task_xyz"],
                                        ["--lm_eval_tasks no_such_task_xyz: no such task in lm-eval"]),
    }[name]


def run(cmd, cwd):
    return subprocess.run([sys.executable] + [str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          env=child_env(), timeout=300)


CASES = ["counts", "paths_that_do_not_exist", "paths_of_the_wrong_kind", "contents", "run_base_recorded_relative",
         "lm_eval_task_does_not_exist"]


@pytest.mark.parametrize("name", CASES)
def test_bad_evaluation_input_is_one_error_before_any_model_loads(world, name):
    args, needles = case_args(name, world)
    before = tree_hash(world["root"])
    proc = run([EVALUATE] + args, cwd=world["root"])  # not the project dir the run was trained from
    text = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in text, (name, text[-3000:])
    said = proc.stderr[proc.stderr.index("error:"):]
    for needle in needles:
        assert needle in said, (name, needle, said)
    listed = [line for line in said.splitlines() if line.startswith("  - ")]
    assert max(len(listed), 1) == len(needles), f"{name}: other problems than those made: {said}"
    assert "not a PEFT adapter" not in said and "Loading weights" not in text, (name, said)
    assert tree_hash(world["root"]) == before, f"{name}: files were written or changed"
    assert not world["out"].exists() and not (world["run"] / "eval").exists()


def test_the_tripwire_base_passes_every_check_and_crashes_when_loaded(world):
    """The control: a valid request on the tripwire base gets past the checks and dies loading it, with a traceback
    and before writing anything; so the refusals above happened before any load."""
    proc = run([EVALUATE, "--base_model", world["trip"], "--output_dir", world["out"], "--task_file",
                f"good={world['good']}", "--adapter", f"a={world['adapter']}", "--limit", "2"], cwd=world["root"])
    text = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 2) and "Traceback" in text and "ignore_mismatched_sizes" in text, text[-3000:]
    assert "error:" not in proc.stderr and not world["out"].exists()


def test_prepare_assets_refuses_an_assets_dir_that_is_a_file_before_downloading(tmp_path):
    assets = tmp_path / "assets"
    assets.write_text("x\n")
    proc = run([PREPARE, "bbh", "smollm2", "--assets_dir", assets], cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert f"--assets_dir {assets} is a file; expected a directory" in errors[0], errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"] and assets.read_text() == "x\n"
    assert "download" not in proc.stdout.lower(), proc.stdout
