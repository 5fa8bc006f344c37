"""Sequential tasks: --clora_p_init adapters (P spans earlier adapters' lora_A rows / lora_B columns, completed by the
activations where they span fewer than k) and --base_adapters (earlier adapters merged into the base at start-up),
on the tiny LLaMA; and S_out = W S_in Wᵀ, the calibration's memory fix, against the hook-summed S_out.

Every P is checked against an independent float64 computation: principal angles to the adapters' spans (QR of the
stacked factors), the completion against the top eigenvectors of the projected second moment of activations read by
our own hooks; the merged base against PEFT's merge_and_unload; the ZeRO-3 launcher's first loss against the merged
model's.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tree_hash
from test_activation_subspace import ROW_LEN, TOKENS, load_base, module_activations, subspace_distance, texts, write_text
from test_train import launch, losses, train_args

TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"  # test_train's
R = 2


def make_adapter(model_dir, path: Path, seed: int, r: int = R) -> Path:
    """A PEFT LoRA adapter of the tiny model with random A and B (init_lora_weights=False: B is not zero), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base(model_dir), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS.split(","),
                                                            init_lora_weights=False))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_model_dir, root / "a1", seed=1), make_adapter(tiny_model_dir, root / "a2", seed=2)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("calibration") / "general.txt", texts(300, seed=11))


def factors(adapter_dir):
    """{module: (A [r, in], B [out, r])} float64, read back independently."""
    out = {}
    for key, t in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():
        module, side = key[len("base_model.model."):].rsplit(".lora_", 1)
        out.setdefault(module, {})[side[0]] = t.double()
    return {m: (s["A"], s["B"]) for m, s in out.items()}


def largest_angle(p, reference) -> float:
    """The largest principal angle between span(reference) and span(p) ⊇ it: asin ‖(I − P Pᵀ) Q‖₂, Q = QR(reference)."""
    q, _ = torch.linalg.qr(reference.double())
    p = p.double()
    return torch.asin(torch.linalg.matrix_norm(q - p @ (p.T @ q), ord=2).clamp(max=1)).item()


def adapter_p(model_dir, adapter_dirs, k, calibration=None):
    """The library's P for --clora_p_init adapters in this process: (whole P, the spans)."""
    from transformers import AutoTokenizer

    from clora_ds import CLoRAConfig, attach_clora
    from clora_ds.base_adapters import plan_adapter_spans
    from clora_ds.calibration import calibrate_subspaces, read_calibration

    spec = ",".join(map(str, adapter_dirs))
    cfg = CLoRAConfig(r=4, alpha=8, dropout=0.0, k=k, p_init="adapters", p_adapters=spec,
                      p_data=str(calibration) if calibration else None, p_tokens=TOKENS, target_modules=TARGETS)
    base = load_base(model_dir)
    shapes = {n: (m.out_features, m.in_features) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = attach_clora(base, cfg)
    spans, problems = plan_adapter_spans(spec, {n: shapes[n] for n in model.clora.subspaces}, shapes, k, bool(calibration))
    assert not problems, problems
    rows = []
    if calibration:
        rows = read_calibration(str(calibration), TOKENS, AutoTokenizer.from_pretrained(str(model_dir)), ROW_LEN, None).rows
    full = calibrate_subspaces(model, rows, batch_size=4, log=lambda _: None, spans=spans)
    assert not model.clora.pending
    return full, spans, rows


def test_adapters_p_spans_the_earlier_adapters_a_rows_and_b_columns(tiny_model_dir, adapters):
    full, _, _ = adapter_p(tiny_model_dir, adapters, k=2 * R)  # two adapters of rank 2: 4 directions, no data needed
    a1, a2 = factors(adapters[0]), factors(adapters[1])
    assert len(full) == 10
    worst = 0.0
    for name, (p_in, p_out) in full.items():
        assert p_in.shape == (a1[name][0].shape[1], 2 * R) and p_out.shape == (a1[name][1].shape[0], 2 * R)
        for p in (p_in, p_out):
            eye = p.double().T @ p.double()
            assert (eye - torch.eye(2 * R, dtype=torch.float64)).abs().max() < 1e-6  # orthonormal (float32 storage)
        rows = torch.cat([a1[name][0], a2[name][0]]).T       # [in, 4]: every A row of both adapters
        columns = torch.cat([a1[name][1], a2[name][1]], 1)   # [out, 4]: every B column
        angles = (largest_angle(p_in, rows), largest_angle(p_out, columns))
        worst = max(worst, *angles)
        assert max(angles) < 1e-6, (name, angles)
        other = torch.randn(p_in.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert largest_angle(p_in, other) > 0.1  # an unrelated span is far: the check can fail
    print(f"largest principal angle to the adapters' spans: {worst:.2e} rad")


def test_completion_is_the_projected_moment_top_eigenvectors_orthogonal_to_the_span(tiny_model_dir, adapters, calibration):
    k = R + 2  # one adapter spans 2 of k = 4: two columns from the activations
    full, spans, rows = adapter_p(tiny_model_dir, adapters[:1], k=k, calibration=calibration)
    a1 = factors(adapters[0])
    acts = module_activations(load_base(tiny_model_dir), sorted(full), rows)
    checked, worst = 0, 0.0
    for name, (p_in, p_out) in full.items():
        for side, x, p, span in (("in", acts[name][0], p_in, a1[name][0].T), ("out", acts[name][1], p_out, a1[name][1])):
            p = p.double()
            assert largest_angle(p[:, :R], span) < 1e-6, (name, side)
            completion = p[:, R:]
            assert (p[:, :R].T @ completion).abs().max() < 1e-6, (name, side)  # orthogonal to the span
            q, _ = torch.linalg.qr(span)
            proj = torch.eye(q.shape[0], dtype=torch.float64) - q @ q.T
            values, vectors = torch.linalg.eigh(proj @ (x.T @ x) @ proj)  # float64 reference, ascending
            values, vectors = values.flip(0), vectors.flip(1)
            if values[k - R - 1] / values[k - R] < 1.05:  # no clear gap: the reference's own top-2 is ill-defined
                continue
            checked += 1
            d = subspace_distance(completion, vectors[:, :k - R])
            worst = max(worst, d)
            assert d < 1e-6, f"{name} P_{side}: completion {d:.3g} from the float64 reference"
            assert subspace_distance(completion, vectors[:, 1:k - R + 1]) > 0.5
    print(f"completion vs the float64 projected-moment reference: {checked} of 20 P with a gap, worst distance {worst:.2e}")
    assert checked >= 12, checked  # of 20 P: most have a clear gap


def test_s_out_from_w_equals_the_hook_summed_output_moment(tiny_model_dir, calibration):
    """The memory fix: Σ (W x)(W x)ᵀ summed by output hooks (float64 products, float32 sums) vs W S_in Wᵀ in float64."""
    from transformers import AutoTokenizer

    from clora_ds.calibration import accumulate_second_moments, read_calibration

    rows = read_calibration(str(calibration), 1024, AutoTokenizer.from_pretrained(str(tiny_model_dir)), ROW_LEN, None).rows
    model = load_base(tiny_model_dir)
    layers = {n: m for n, m in model.named_modules() if n.endswith(tuple(TARGETS.split(",")))}
    moments = accumulate_second_moments(model, layers, rows, 2, torch.device("cpu"), outputs=layers)
    assert len(moments.outputs) == 10 and len(moments.inputs) == 6
    worst = 0.0
    for name, layer in layers.items():
        w = layer.weight.double()
        derived = w @ moments.inputs[moments.group[name]].double() @ w.T
        summed = moments.outputs[name].double()
        worst = max(worst, ((derived - summed).norm() / summed.norm()).item())
    print(f"largest relative difference of W S_in Wᵀ from the summed S_out: {worst:.2e}")
    assert worst < 1e-6
    only_inputs = accumulate_second_moments(model, layers, rows[:1], 1, torch.device("cpu"))  # the default: no output sums
    assert only_inputs.outputs == {} and len(only_inputs.inputs) == 6


def test_base_adapters_merge_equals_peft_merge_and_unload(tiny_model_dir, adapters, tmp_path):
    """The launcher's start-up model (build_model with plan_run's adapters) holds W + Σ s·B·A: PEFT's merge_and_unload of
    the same adapters in the same order, within 1e-6 (fp32)."""
    from peft import PeftModel

    from clora_ds.arguments import parse_train_arguments
    from clora_ds.model import build_model
    from clora_ds.plan import plan_run

    spec = f"{adapters[0]},{adapters[1]}"
    groups = parse_train_arguments(train_args(tiny_model_dir, tmp_path / "out", base_adapters=spec))
    plan = plan_run(*groups, world=1)
    assert [a.path for a in plan.base_adapters] == list(adapters)
    model, _ = build_model(str(tiny_model_dir), plan.clora, {}, "sdpa", torch.float32, base_adapters=plan.base_adapters)
    ours = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    reference = load_base(tiny_model_dir)
    for adapter in adapters:
        reference = PeftModel.from_pretrained(reference, str(adapter)).merge_and_unload()
    ref = reference.state_dict()
    plain = load_base(tiny_model_dir).state_dict()
    changed = 0
    for key, value in ref.items():
        got = ours[key.replace(".weight", ".base_layer.weight")] if key.replace(".weight", ".base_layer.weight") in ours else ours[key]
        assert (got - value).abs().max() < 1e-6, key
        changed += not torch.equal(value, plain[key])
    assert changed == 10  # the merge did change every adapted weight
    assert not (tmp_path / "out").exists()


def test_refused_before_anything_is_written(tiny_model_dir, adapters, calibration, tmp_path):
    from clora_ds.arguments import parse_train_arguments
    from clora_ds.errors import RunProblems
    from clora_ds.plan import plan_run

    a1 = adapters[0]
    wrong = shutil.copytree(a1, tmp_path / "wrong_shape")
    tensors = load_file(str(wrong / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("layers.0.mlp.down_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    dora = shutil.copytree(a1, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    p_init = {"clora_p_init": "adapters"}
    cases = [
        ({**p_init, "clora_p_adapters": str(a1), "clora_k": 4},
         ["the adapters span fewer than --clora_k 4 directions in 20 of 20 P(s)", "lower --clora_k to 2, or give "
          "--clora_p_data"]),
        ({**p_init, "clora_p_adapters": f"{a1},{adapters[1]}", "clora_k": 3},
         ["span more than --clora_k 3 directions in 20 P(s) (up to 4", "use --clora_k 4 or more"]),
        ({**p_init, "clora_p_adapters": str(tmp_path / "missing"), "clora_k": 2},
         [f"--clora_p_adapters {tmp_path / 'missing'}: no such directory"]),
        ({**p_init, "clora_p_adapters": str(wrong), "clora_k": 2},
         ["model.layers.0.mlp.down_proj lora_A [2, 71] / lora_B [40, 2], expected [2, 72] / [40, 2]"]),
        ({"base_adapters": str(dora)}, [f"--base_adapters {dora}: DoRA"]),
        ({"base_adapters": str(a1), "load_in_4bit": "true"}, ["--base_adapters with --load_in_4bit: merging into a "
                                                               "quantized base is lossy"]),
        ({"clora_p_adapters": str(a1)}, ["--clora_p_adapters is read only by p_init adapters"]),
        (p_init, ["--clora_p_adapters is needed by p_init adapters"]),
    ]
    out = tmp_path / "out"
    for over, expected in cases:
        with pytest.raises(RunProblems) as err:
            plan_run(*parse_train_arguments(train_args(tiny_model_dir, out, **over)), world=1)
        for text in expected:
            assert text in str(err.value), (over, str(err.value))
        assert not out.exists(), over
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_hash(out)
    proc = launch(tiny_model_dir, out, ranks=1, check=False, clora_p_init="adapters", clora_p_adapters=str(a1), clora_k=4)
    assert proc.returncode == 2 and "error:" in proc.stderr and "fewer than --clora_k 4" in proc.stderr, proc.stderr[-2000:]
    assert tree_hash(out) == before


def first_step_loss(model, model_dir, out, **over) -> float:
    """The task loss of step 1 over both ranks' micro-batches (LoRA B = 0: the base's own loss), as train_step sums it."""
    from clora_ds.arguments import parse_train_arguments
    from clora_ds.plan import plan_run

    plan = plan_run(*parse_train_arguments(train_args(model_dir, out, per_device_train_batch_size=2, **over)), world=2)
    n = plan.batches.label_tokens(0)
    with torch.no_grad():
        return sum(model(**b, use_cache=False, num_items_in_batch=n).loss.item() for r in (0, 1)
                   for b in plan.batches.micro_batches(0, r))


@pytest.mark.slow
def test_sequential_task_under_zero3_and_resume_with_other_base_adapters_refused(tiny_model_dir, adapters, tmp_path):
    """Task 2 of O-LoRA-style training: --base_adapters a1 --clora_p_init adapters --clora_p_adapters a1, ZeRO-3, 2 ranks,
    sharded P. Its first loss is the merged model's (the merge happened on the partitioned weights), its saved P spans
    a1, the adapter's card and train_config.json say what was merged; a resume with other base adapters is refused."""
    from peft import PeftModel

    a1, a2 = map(str, adapters)
    out = tmp_path / "task2"
    over = dict(base_adapters=a1, clora_p_init="adapters", clora_p_adapters=a1, clora_k=R)
    proc = launch(tiny_model_dir, out, config="zero3.json", max_steps=2, save_steps=1, clora_p_shard="auto", **over)
    assert "ZeRO stage 3" in proc.stdout and "sharded: 2 ranks" in proc.stdout
    assert "P from the adapters' spans: 10 modules" in proc.stdout and "no completion needed" in proc.stdout
    merged = PeftModel.from_pretrained(load_base(tiny_model_dir), a1).merge_and_unload().eval()
    expected = first_step_loss(merged, tiny_model_dir, tmp_path / "plan", **over)
    plain = first_step_loss(load_base(tiny_model_dir), tiny_model_dir, tmp_path / "plan", **over)
    got = losses(out)[0]
    assert abs(got - expected) < 1e-4 and abs(plain - expected) > 1e-2, (got, expected, plain)
    saved = load_file(str(out / "adapter" / "clora_subspaces.safetensors"))
    a = factors(a1)
    for name, (lora_a, lora_b) in a.items():
        assert largest_angle(saved[f"{name}.p_in"], lora_a.T) < 1e-6 and largest_angle(saved[f"{name}.p_out"], lora_b) < 1e-6
    assert json.loads((out / "adapter" / "clora_config.json").read_text())["p_fingerprint"].startswith("adapters sha256:")
    assert f"base adapters | {a1} (merged into the base before training)" in (out / "adapter" / "README.md").read_text()
    settings = json.loads((out / "train_config.json").read_text())
    assert settings["arguments"]["base_adapters"] == a1 and settings["run"]["base_adapters"][0]["path"] == a1
    before = tree_hash(out)
    from clora_ds.arguments import parse_train_arguments
    from clora_ds.errors import RunProblems
    from clora_ds.plan import plan_run

    for other in (a2, None):  # what every rank of a 2-rank resume checks first
        args = train_args(tiny_model_dir, out, config="zero3.json", max_steps=2, save_steps=1, per_device_train_batch_size=2,
                          clora_p_shard="auto", resume_from_checkpoint="auto",
                          **{**over, "base_adapters": other} if other else {k: v for k, v in over.items() if k != "base_adapters"})
        with pytest.raises(RunProblems) as err:
            plan_run(*parse_train_arguments(args), world=2)
        problem, = err.value.problems  # the only difference named
        assert "it was trained with other settings" in problem and problem.endswith(
            f"--base_adapters: {[a1]} merged into the base in the checkpoint, {[other] if other else 'none'} now (the same "
            "adapters' files, in the same order, are needed)"), problem
        assert tree_hash(out) == before


@pytest.mark.slow
def test_evaluation_applies_the_base_adapters_a_run_was_trained_on(tiny_model_dir, adapters, tmp_path):
    """launch/evaluate.py's --base_adapters: a --run_dir trained on base + a1 is evaluated on base + a1 (its recorded
    files), giving the numbers of a base merged by PEFT's merge_and_unload; its adapter alone without --base_adapters, or
    with other ones, is refused before anything loads or is written."""
    from peft import PeftModel

    from clora_ds.errors import RunProblems
    from clora_ds.evaluation.run import EvalRequest, check_request, run_evaluation

    a1, a2 = map(str, adapters)
    run = tmp_path / "task2"
    launch(tiny_model_dir, run, ranks=1, max_steps=2, base_adapters=a1)
    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(12, seed=5)))
    before = tree_hash(tmp_path)
    for over, expect in [({}, f"was trained on the base with earlier adapters merged into it ({a1}); pass "
                               f"--base_adapters {a1}"),
                         ({"base_adapters": a2}, f"was trained with base adapters {a1}, not the ones --base_adapters {a2}")]:
        with pytest.raises(RunProblems) as err:
            check_request(EvalRequest(base_model=str(tiny_model_dir), adapters=[("t2", run / "adapter")],
                                      loss_files=[("general", text)], output_dir=tmp_path / "refused", **over))
        assert len(err.value.problems) == 1 and expect in err.value.problems[0], err.value.problems
    assert tree_hash(tmp_path) == before

    got = run_evaluation(EvalRequest(run_dir=run, loss_files=[("general", text)], weights=False))
    assert got["base_adapters"] == [{"path": a1, "fingerprint": got["base_adapters"][0]["fingerprint"]}]
    assert "merged into it (--base_adapters)" in (run / "eval" / "eval_results.md").read_text()
    # the reference: base + a1 merged by PEFT and saved; the run's adapter copied away from its run record
    merged_dir, lone = tmp_path / "merged", tmp_path / "lone" / "adapter"
    PeftModel.from_pretrained(load_base(tiny_model_dir), a1).merge_and_unload().save_pretrained(str(merged_dir))
    shutil.copytree(tiny_model_dir, merged_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    shutil.copytree(run / "adapter", lone)
    ref = run_evaluation(EvalRequest(base_model=str(merged_dir), adapters=[("task2", lone)], loss_files=[("general", text)],
                                     weights=False, output_dir=tmp_path / "ref"))
    plain = run_evaluation(EvalRequest(base_model=str(tiny_model_dir), loss_files=[("general", text)], weights=False,
                                       output_dir=tmp_path / "plain"))
    nll = lambda res, name: res["models"][name]["loss"]["general"]["nll"]  # noqa: E731
    assert abs(nll(got, "base") - nll(ref, "base")) < 1e-5 and abs(nll(got, "task2") - nll(ref, "task2")) < 1e-5
    assert abs(nll(got, "base") - nll(plain, "base")) > 1e-3  # the merge is what made the difference
    # --merge of that run: base + a1 + its adapter, a1 merged first (as the run recorded), verified; other files refused
    from transformers import AutoModelForCausalLM

    from clora_ds.errors import CheckpointError
    from clora_ds.export.convert import convert_checkpoint

    with pytest.raises(CheckpointError, match=f"trained on the base with {a1} merged into it; these files differ"):
        convert_checkpoint(run / "checkpoint-2", tmp_path / "merged_wrong", merge=True, base_adapters=a2)
    assert not (tmp_path / "merged_wrong").exists()
    done = convert_checkpoint(run / "checkpoint-2", tmp_path / "merged_run", merge=True, verify=True)
    assert done.verification.passed
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32),
                                     str(lone)).merge_and_unload().eval()
    written = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged_run"), dtype=torch.float32).eval()
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (written(input_ids=ids).logits - want(input_ids=ids).logits).abs().max().item()
        alone = (written(input_ids=ids).logits - PeftModel.from_pretrained(load_base(tiny_model_dir), str(lone))
                 .merge_and_unload()(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5 and alone > 1e-3, (diff, alone)
    assert f"The earlier adapters the run trained on ({a1}" in (tmp_path / "merged_run" / "README.md").read_text()
    # the same files moved elsewhere: --base_adapters points at them, the same model comes out
    moved = shutil.copytree(a1, tmp_path / "moved" / "a1")
    convert_checkpoint(run / "checkpoint-2", tmp_path / "merged_moved", merge=True, base_adapters=str(moved))
    weights = lambda d: {f.name: f.read_bytes() for f in sorted(d.glob("*.safetensors"))}  # noqa: E731
    assert weights(tmp_path / "merged_moved") == weights(tmp_path / "merged_run") != {}
