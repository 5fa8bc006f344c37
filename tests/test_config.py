import pytest

from clora_ds import CLoRAConfig


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = CLoRAConfig(r=4, k=16, lam=0.5, target_modules="q_proj, v_proj")
    assert cfg.target_modules == ["q_proj", "v_proj"]
    cfg.save(tmp_path)
    assert CLoRAConfig.load(tmp_path) == cfg


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"lam": -0.1}, "lam (λ) must be a finite number >= 0 (0 is plain LoRA), got -0.1"),
        ({"p_init": "random"}, "p_init 'random' is not one of orthogonal, svd_major, svd_minor, activations"),
        ({"p_dtype": "int8"}, "p_dtype 'int8' is not one of"),
        ({"k": 0}, "k must be a positive integer"),
        ({"r": 0}, "r must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"target_modules": ""}, "target_modules is empty"),
    ],
)
def test_bad_values_are_named(kwargs, needle):
    with pytest.raises(ValueError) as err:
        CLoRAConfig(**kwargs)
    assert needle in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as err:
        CLoRAConfig(lam=-1, p_init="nope")
    assert "lam" in str(err.value) and "p_init" in str(err.value)


def test_unknown_keys_rejected(tmp_path):
    (tmp_path / "clora_config.json").write_text('{"k": 4, "lamda": 1.0}')
    with pytest.raises(ValueError, match="Unknown CLoRA config keys \\['lamda'\\]"):
        CLoRAConfig.load(tmp_path)
