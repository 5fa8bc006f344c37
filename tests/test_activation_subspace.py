"""--clora_p_init activations: P from the base model's activations on calibration text, on the tiny LLaMA.

P_in = top-k eigenvectors of Σ x xᵀ over a module's inputs, P_out = those of Σ (Wx)(Wx)ᵀ over its frozen outputs.
Checked against an independent float64 computation (a plain forward with our own hooks), under ZeRO-2 and ZeRO-3
with and without sharded P through the real launcher, saved whole and carried bit for bit into checkpoints and the
adapter, kept (never recomputed) on resume, and worth it: on held-out text it holds far more of the activations'
energy than the paper's random P at the same k.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tree_hash
from test_train import launch, losses

K = 2          # the tiny random LLaMA's spectra are flat; k = 2 has the clearest gap λ_k/λ_k+1 (>= 1.1) in every module
TOKENS = 3000  # calibration tokens: 12 rows of 256
ROW_LEN = 256  # --max_seq_length of test_train.launch
SUBSPACES = "clora_subspaces.safetensors"


def texts(n, seed):
    from clora_ds.tiny import record_text, sample_records

    return [record_text(r) for r in sample_records(n, seed=seed)]


def write_text(path: Path, docs) -> Path:
    path.write_text("\n\n".join(docs) + "\n")  # plain text: one document per blank-line separated block
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    return write_text(root / "general.txt", texts(300, seed=11))


def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def config(calibration, **over):
    from clora_ds import CLoRAConfig

    return CLoRAConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, "k": K, "p_init": "activations", "p_data": str(calibration),
                          "p_tokens": TOKENS, **over})


@pytest.fixture(scope="module")
def single(tiny_model_dir, calibration):
    """The library's calibration in this process: (rows, whole P, the CLoRA settings)."""
    from transformers import AutoTokenizer

    from clora_ds import attach_clora
    from clora_ds.calibration import calibrate_subspaces, read_calibration

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    data = read_calibration(str(calibration), TOKENS, tokenizer, ROW_LEN, None)
    cfg = config(calibration)
    model = attach_clora(load_base(tiny_model_dir), cfg)
    assert model.clora.pending
    model.train()
    full = calibrate_subspaces(model, data.rows, batch_size=4, log=lambda _: None)
    assert not model.clora.pending and all(m.training for m in model.modules())  # back in train mode
    return data, full, cfg


def module_activations(model, names, rows):
    """{name: (inputs [N, in], outputs [N, out])} float64, from a plain forward of each row with our own hooks."""
    got = {n: ([], []) for n in names}
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(module, inputs, output):
            got[name][0].append(inputs[0].reshape(-1, inputs[0].shape[-1]).double())
            got[name][1].append(output.reshape(-1, output.shape[-1]).double())
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([row]))
    for h in handles:
        h.remove()
    return {n: (torch.cat(x), torch.cat(y)) for n, (x, y) in got.items()}


def subspace_distance(p, q) -> float:
    """‖P Pᵀ − Q Qᵀ‖_F: 0 for the same span, whatever the basis (signs, rotations)."""
    p, q = p.double(), q.double()
    return (p @ p.T - q @ q.T).norm().item()


def test_p_is_the_float64_top_eigenvectors_of_the_activations(single, tiny_model_dir, calibration):
    from transformers import AutoTokenizer

    data, full, _ = single
    # the calibration tokens, rebuilt by hand: [bos] text [eos] per document, concatenated, cut into rows
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    stream = [t for doc in texts(300, seed=11) for t in [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
              + [tok.eos_token_id]][:TOKENS]
    assert data.rows == [stream[i:i + ROW_LEN] for i in range(0, TOKENS, ROW_LEN)]
    acts = module_activations(load_base(tiny_model_dir), sorted(full), data.rows)
    assert len(full) == 10  # q, k, v, up, down in 2 layers
    worst = 0.0
    for name, (p_in, p_out) in full.items():
        for side, x, p in (("in", acts[name][0], p_in), ("out", acts[name][1], p_out)):
            values, vectors = torch.linalg.eigh(x.T @ x)  # float64, ascending
            values, vectors = values.flip(0), vectors.flip(1)
            assert values[K - 1] / values[K] > 1.1, f"{name} {side}: no clear gap at k={K}: {values[:K + 2].tolist()}"
            assert p.shape == (x.shape[1], K) and p.dtype == torch.float32
            d = subspace_distance(p, vectors[:, :K])
            worst = max(worst, d)
            assert d < 1e-6, f"{name} P_{side}: distance {d:.3g} from the float64 top-{K} eigenvectors"
            assert subspace_distance(p, vectors[:, 1:K + 1]) > 0.5  # a neighbouring span is far: the check can fail
    # modules that read the same input (q, k, v) share one second moment: one P_in for the three
    for layer in (0, 1):
        q, k, v = (full[f"model.layers.{layer}.self_attn.{m}_proj"][0] for m in "qkv")
        assert torch.equal(q, k) and torch.equal(q, v)
    print(f"worst subspace distance from float64: {worst:.2e}")


def test_captured_energy_on_held_out_text_far_above_random_p(single, tiny_model_dir):
    """‖Pᵀx‖² / ‖x‖² over held-out text (documents never calibrated on), inputs with P_in and outputs with P_out."""
    from transformers import AutoTokenizer

    from clora_ds.subspace import build_module_subspaces

    _, full, cfg = single
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    held_out = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for t in texts(150, seed=12)]
    acts = module_activations(load_base(tiny_model_dir), sorted(full), held_out)
    ours, random = [], []
    for name, (x, y) in acts.items():
        shape = (y.shape[1], x.shape[1])
        r_in, r_out = build_module_subspaces(name, shape, type(cfg)(k=K, seed=3))  # the paper's orthogonal P
        for act, p, r in ((x, full[name][0], r_in), (y, full[name][1], r_out)):
            total = act.pow(2).sum()
            ours.append(((act @ p.double()).pow(2).sum() / total).item())
            random.append(((act @ r.double()).pow(2).sum() / total).item())
    mean_ours, mean_random = sum(ours) / len(ours), sum(random) / len(random)
    report = (f"held-out energy at k={K}: activations P {mean_ours:.3f} (min {min(ours):.3f}), random orthogonal P "
              f"{mean_random:.3f} (max {max(random):.3f}); modules' k/d from {K / 72:.3f} to {K / 20:.3f}")
    print(report)
    assert mean_ours > 3 * mean_random and min(ours) > max(random), report


def test_refused_before_anything_is_written(tiny_model_dir, calibration, tmp_path):
    """Each problem is one message before any file is written: no --clora_p_data, a file that is not there, too few
    tokens (for --clora_p_tokens and for the file), k above a module's dimension, --clora_p_data for a seeded P."""
    from transformers import AutoTokenizer

    from clora_ds.arguments import parse_train_arguments
    from clora_ds.errors import RunProblems
    from clora_ds.plan import plan_run
    from test_train import train_args

    tiny = write_text(tmp_path / "tiny.txt", ["one two"])
    n = len(AutoTokenizer.from_pretrained(str(tiny_model_dir))("one two", add_special_tokens=False)["input_ids"]) + 2
    assert n + 1 <= 20  # k = n + 1 fits every module: only the tokens are too few
    cases = [
        ({"clora_p_init": "activations"}, ["--clora_p_data is needed by p_init activations"]),
        ({"clora_p_init": "activations", "clora_p_data": str(tmp_path / "missing.txt")},
         [f"--clora_p_data {tmp_path / 'missing.txt'}: no such file"]),
        ({"clora_p_init": "activations", "clora_p_data": str(calibration), "clora_p_tokens": 1},
         ["--clora_p_tokens 1 is fewer than k=2", "need at least k tokens (>= 8 for a stable estimate)"]),
        ({"clora_p_init": "activations", "clora_p_data": str(tiny), "clora_k": n + 1},
         [f"--clora_p_data {tiny} holds {n} tokens, fewer than --clora_k {n + 1}",
          f"P needs at least k = {n + 1} tokens (>= {4 * (n + 1)}"]),
        ({"clora_p_init": "activations", "clora_p_data": str(calibration), "clora_k": 30},
         ["k=30 is larger than the in or out dimension of 4 targeted module(s)", "Use k <= 20"]),
        ({"clora_p_data": str(calibration)}, ["--clora_p_data is read only by p_init activations, and p_init is "
                                              "'orthogonal'"]),
    ]
    out = tmp_path / "out"
    for over, expected in cases:
        groups = parse_train_arguments(train_args(tiny_model_dir, out, **{"clora_k": K, **over}))
        with pytest.raises(RunProblems) as err:
            plan_run(*groups, world=1)
        for text in expected:
            assert text in str(err.value), (over, str(err.value))
        assert not out.exists(), over
    # the launcher: one error line, exit status 2, the output directory untouched (both problems named at once)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_hash(out)
    proc = launch(tiny_model_dir, out, ranks=1, check=False, clora_p_init="activations", clora_k=30,
                  clora_p_data=str(tmp_path / "missing.txt"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "no such file" in proc.stderr and "k=30 is larger" in proc.stderr
    assert tree_hash(out) == before


def test_qlora_p_out_is_the_dequantized_output(tiny_model_dir, calibration, single):
    """On a 4-bit base the hooks read the layer's output, the dequantized W·x: P_out is the top-k of its second moment."""
    pytest.importorskip("bitsandbytes")
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from clora_ds import attach_clora
    from clora_ds.calibration import calibrate_subspaces
    from clora_ds.model import keep_4bit_cpu_forward_as_trained

    data, _, cfg = single
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, quantization_config=q)
    keep_4bit_cpu_forward_as_trained(base)  # as build_model does: the training forward in eval mode too
    model = attach_clora(base, config(calibration, target_modules="up_proj"))
    full = calibrate_subspaces(model, data.rows[:4], batch_size=2, log=lambda _: None)
    layer = dict(model.named_modules())["base_model.model.model.layers.1.mlp.up_proj"].get_base_layer()
    assert type(layer.weight).__name__ == "Params4bit"
    x = module_activations(model.get_base_model(), ["model.layers.1.mlp.up_proj.base_layer"], data.rows[:4])
    inputs = x["model.layers.1.mlp.up_proj.base_layer"][0]
    y = inputs @ dequantize_module_weight(layer).double().T  # [N, out]: W dequantized, by PEFT's own reader
    values, vectors = torch.linalg.eigh(y.T @ y)
    assert subspace_distance(full["model.layers.1.mlp.up_proj"][1], vectors[:, -K:]) < 1e-5


# ---------------------------------------------------------------------------------------------------
# the launcher, 2 CPU ranks
# ---------------------------------------------------------------------------------------------------
def activations_run(model_dir, out, calibration_file, config_name, shard, **over):
    return launch(model_dir, out, config=config_name, clora_k=K, clora_p_init="activations",
                  clora_p_data=str(calibration_file), clora_p_tokens=TOKENS, clora_p_shard=shard, **over)


@pytest.fixture(scope="module")
def zero3_sharded(tiny_model_dir, calibration, tmp_path_factory):
    """ZeRO-3, P sharded over the 2 ranks, 4 steps with a checkpoint at 2; its own calibration file (the resume test
    changes it)."""
    root = tmp_path_factory.mktemp("zero3")
    own = shutil.copy(calibration, root / "general.txt")
    proc = activations_run(tiny_model_dir, root / "run", own, "zero3.json", "auto", max_steps=4, save_steps=2)
    return root / "run", Path(own), proc


def saved(directory):
    return load_file(str(Path(directory) / SUBSPACES))


@pytest.mark.slow
def test_zero2_and_zero3_save_the_same_p_whole_with_and_without_sharding(single, zero3_sharded, tiny_model_dir,
                                                                        calibration, tmp_path):
    from clora_ds import CLoRAConfig
    from clora_ds.evaluation.weights import read_adapter, subspace_leakage
    from clora_ds.subspace import build_module_subspaces

    data, full, _ = single
    zero2 = tmp_path / "zero2"
    proc2 = activations_run(tiny_model_dir, zero2, calibration, "zero2.json", "off", max_steps=2)
    zero3, _, proc3 = zero3_sharded
    assert "ZeRO stage 2" in proc2.stdout and "every rank holds all of it" in proc2.stdout
    assert "ZeRO stage 3" in proc3.stdout and "sharded: 2 ranks" in proc3.stdout
    for proc in (proc2, proc3):
        assert "P from activations: 3,000 tokens over 2 rank(s); 6 input second moments for 10 modules" in proc.stdout
    for run in (zero2, zero3):
        whole = saved(run / "adapter")
        assert sorted(whole) == sorted(f"{n}.{s}" for n in full for s in ("p_in", "p_out"))
        for name, (p_in, p_out) in full.items():  # every column, whatever the sharding: [in, k] and [out, k]
            for got, ref in ((whole[f"{name}.p_in"], p_in), (whole[f"{name}.p_out"], p_out)):
                assert got.shape == ref.shape == (ref.shape[0], K)
                assert subspace_distance(got, ref) < 1e-5, (run.name, name)
        # bit for bit: OUT's copy, each checkpoint's, the adapter's; and what the loaders return
        for other in [run] + sorted(run.glob("checkpoint-*")):
            again = saved(other)
            assert all(torch.equal(again[key], whole[key]) for key in whole), other
        cfg = CLoRAConfig.load(run / "adapter")
        assert cfg.p_init == "activations" and cfg.p_fingerprint == data.fingerprint
        name = "model.layers.1.mlp.down_proj"
        p_in, p_out = build_module_subspaces(name, (40, 72), cfg, saved=run / "adapter")
        assert torch.equal(p_in, whole[f"{name}.p_in"]) and torch.equal(p_out, whole[f"{name}.p_out"])
        adapter = read_adapter(run / "adapter")
        leak = subspace_leakage(adapter, cfg)
        a, b = adapter.factors[name]
        assert leak[name][0] == pytest.approx((a @ whole[f"{name}.p_in"].double()).pow(2).sum().item(), rel=1e-12)
        assert leak[name][2] == pytest.approx((b.T @ whole[f"{name}.p_out"].double()).pow(2).sum().item(), rel=1e-12)
    # the same P trains the same: unsharded ZeRO-2 and sharded ZeRO-3 agree step for step
    got, ref = losses(zero3)[:2], losses(zero2)
    assert max(abs(x - y) for x, y in zip(got, ref)) < 1e-4, (got, ref)


@pytest.mark.slow
def test_resume_keeps_the_saved_p_when_the_calibration_file_changed(zero3_sharded, tiny_model_dir, single, tmp_path):
    """The calibration file is read once, at the start: P is part of the run from then on. A resume after the file
    changed continues with the saved P (every rank reads its columns from the checkpoint; none recomputes it) and
    reproduces the uninterrupted run's losses; recomputing from the changed file would have given another P."""
    from transformers import AutoTokenizer

    from clora_ds import attach_clora
    from clora_ds.calibration import calibrate_subspaces, read_calibration

    original, own, _ = zero3_sharded
    run = tmp_path / "run"
    shutil.copytree(original, run)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    write_text(own, texts(300, seed=99))  # other documents at the same path
    proc = activations_run(tiny_model_dir, run, own, "zero3.json", "auto", max_steps=4, save_steps=2,
                           resume_from_checkpoint="auto")
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert "has changed since then, and is not read again" in proc.stdout
    assert "P from activations" not in proc.stdout  # no calibration pass on any rank
    got, uninterrupted = losses(run), losses(original)
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(got, uninterrupted)) < 1e-5, (got, uninterrupted)
    kept, first = saved(run / "checkpoint-4"), saved(original / "checkpoint-4")
    assert all(torch.equal(kept[key], first[key]) for key in first)
    assert json.loads((run / "adapter" / "clora_config.json").read_text())["p_fingerprint"] == single[0].fingerprint
    # what a recomputation from the changed file would have given: far from the saved P
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    changed = read_calibration(str(own), TOKENS, tokenizer, ROW_LEN, None)
    model = attach_clora(load_base(tiny_model_dir), config(own))
    other = calibrate_subspaces(model, changed.rows, batch_size=4, log=lambda _: None)
    far = max(subspace_distance(other[n][0], first[f"{n}.p_in"]) for n in other)
    assert far > 0.1, far
