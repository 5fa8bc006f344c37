"""Every recipe in recipes/ is planned as its header command runs it (clora_ds.plan.plan_run: every check a run makes
before it writes; nothing is trained), with a tiny model and tiny data in place of the real ones, so a recipe whose
keys rot fails here.

Only path-like keys are replaced (REPLACED, given as flags after the file, as a user overrides a recipe; cache_dir is
added so the tokenized data goes to a temporary directory). Everything else is planned as shipped, the DeepSpeed
config included (the test runs from the repository root, where the header commands run). bf16 stays on: DeepSpeed's
CPU accelerator reports bf16 support, which is what plan_run checks. No recipe pins flash_attention_2 (asserted
below): they ship attn_implementation auto, which takes flash-attn where it imports and SDPA here, so nothing about
attention needs replacing on CPU. The world size is the header's --num_gpus, so each recipe's global batch is
checked as written. The tiny model is tiny_model_dir's tokenizer on a one-layer LLaMA of hidden size 512 with no
grouped-query attention: the smallest that takes the recipes' k (up to 512 <= every adapted module's in and out)."""
import json
import re
import shlex

import pytest
import yaml

from conftest import DATA, ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
REPLACED = ("model_name_or_path", "train_file", "eval_file", "output_dir")


def header_command(path):
    """The first command line of the recipe's header comment (``deepspeed ...`` or ``python ...``), as argv."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith(("deepspeed ", "python ")):
            return shlex.split(text)
    raise AssertionError(f"{path.name}: no `deepspeed ...` or `python ...` command in the header comment")


@pytest.fixture(scope="module")
def recipe_model_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from clora_ds.tiny import build_tiny_llama

    out = tmp_path_factory.mktemp("recipe_model") / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.save_pretrained(str(out))
    build_tiny_llama(len(tokenizer), hidden_size=512, intermediate_size=768, num_hidden_layers=1, num_attention_heads=8,
                     num_key_value_heads=8, max_position_embeddings=4096).save_pretrained(str(out))
    return out


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """{dataset_format: (train file, eval file)}: tests/data records, repeated until every recipe's warmup fits in its
    run (a recipe's warmup_steps above its total steps is a planning error) and its packed rows fill a global batch."""
    root = tmp_path_factory.mktemp("recipe_data")
    alpaca = [json.loads(line) for line in (DATA / "alpaca_tiny.jsonl").read_text().splitlines()]
    commonsense = [json.loads(line) for line in (DATA / "commonsense_tiny.jsonl").read_text().splitlines()]
    metamath = [{"query": f"{r['instruction']} {r['input']}".strip(), "response": f"{r['output']} The answer is: {r['output']}",
                 "type": "GSM_AnsAug"} for r in alpaca]
    chat = [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"{a['instruction']} {a['input']}".strip()},
                          {"role": "assistant", "content": a["output"]},
                          {"role": "user", "content": f"{b['instruction']} {b['input']}".strip()},
                          {"role": "assistant", "content": b["output"]}]} for a, b in zip(alpaca, alpaca[1:] + alpaca[:1])]
    sets = {"commonsense": commonsense * 80, "metamath": metamath * 8, "messages": chat * 50}
    return {fmt: (_write_jsonl(root / f"{fmt}_train.jsonl", records), _write_jsonl(root / f"{fmt}_eval.jsonl", records[:8]))
            for fmt, records in sets.items()}


def test_there_are_recipes_for_the_papers_settings():
    names = {p.name for p in RECIPES}
    assert {"llama2-7b-commonsense.yaml", "llama3-8b-commonsense.yaml", "llama2-7b-metamath.yaml",
            "llama2-7b-commonsense-qlora.yaml", "llama2-7b-commonsense-lora.yaml", "llama3-8b-instruct-chat.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_header_names_itself_and_plans(recipe, recipe_model_dir, tiny_data, tmp_path, monkeypatch):
    from clora_ds.arguments import parse_train_arguments
    from clora_ds.plan import plan_run

    shipped = yaml.safe_load(recipe.read_text())
    cmd = header_command(recipe)
    assert f"recipes/{recipe.name}" in cmd and "launch/train.py" in cmd, f"{recipe.name}: the header runs {cmd}"
    assert cmd[cmd.index("launch/train.py") + 1] == f"recipes/{recipe.name}", "the recipe is the first argument"
    assert shipped.get("attn_implementation", "auto") != "flash_attention_2", "pin no kernel a machine may lack"
    world = int(cmd[cmd.index("--num_gpus") + 1]) if "--num_gpus" in cmd else 1
    if shipped.get("load_in_4bit") or shipped.get("load_in_8bit"):
        pytest.importorskip("bitsandbytes")

    train_file, eval_file = tiny_data[shipped["dataset_format"]]
    swapped = {"model_name_or_path": recipe_model_dir, "train_file": train_file, "output_dir": tmp_path / "out",
               "cache_dir": tmp_path.parent / "recipe_cache"}
    if "eval_file" in shipped:
        swapped["eval_file"] = eval_file
    assert set(swapped) - {"cache_dir"} <= set(REPLACED) and set(REPLACED) & set(shipped) <= set(swapped)
    monkeypatch.chdir(ROOT)  # the header commands run from the repository root (ds_configs/..., as shipped)
    argv = [f"recipes/{recipe.name}"] + [f"--{k}={v}" for k, v in swapped.items()]
    model, data, clora_args, train = parse_train_arguments(argv)
    plan = plan_run(model, data, clora_args, train, world=world)

    # what was planned is what the recipe says: nothing dropped or defaulted on the way
    assert (plan.clora.r, plan.clora.alpha, plan.clora.k, plan.clora.lam) == (
        shipped["lora_r"], shipped["lora_alpha"], shipped["clora_k"], shipped["clora_lambda"])
    assert plan.batches.global_batch == (shipped["per_device_train_batch_size"] * world
                                         * shipped.get("gradient_accumulation_steps", 1))
    assert plan.batches.packed == shipped.get("packing", False)
    assert train.learning_rate == shipped["learning_rate"] and train.bf16 == shipped.get("bf16", False)
    assert plan.train_data.dataset_format == shipped["dataset_format"]
    assert not (tmp_path / "out").exists(), "planning writes nothing in --output_dir"


def test_docs_list_every_recipe():
    page = (ROOT / "docs" / "recipes.md").read_text()
    missing = [p.name for p in RECIPES if p.name not in page]
    assert not missing, f"docs/recipes.md does not list {missing}"
    assert re.search(r"--clora_k", page), "the page says how to sweep k"
