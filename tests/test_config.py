import pytest
import yaml

from poh_tune.config import ConfigError, TrialConfig, from_dict, load_config, save_config


def test_defaults_match_the_spec():
    c = TrialConfig()
    assert (c.array_len, c.mask_rate, c.train_samples, c.dev_samples, c.test_samples) == (20, 0.5, 1000, 300, 300)
    assert (c.d_model, c.n_heads, c.d_ff, c.d_ctrl) == (128, 4, 256, 64)
    assert (c.temperature_init, c.temperature_min, c.temperature_decay) == (2.0, 0.8, 0.95)
    assert (c.entropy_reg, c.entropy_decay_rate, c.entropy_decay_every) == (1e-3, 0.5, 5)
    assert (c.lr_encoder, c.lr_controller, c.clip_encoder, c.clip_controller) == (3e-4, 1e-4, 1.0, 0.5)
    assert c.controller_warmup_epochs == 5 and c.loss == "ranknet" and c.seeds == (1, 2, 3, 4, 5)


def test_yaml_round_trip(tmp_path):
    c = TrialConfig(seeds=(3, 4), max_inner_iters=6, loss="listnet")
    save_config(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c


def test_overrides_are_yaml_scalars(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nmodel: baseline\n")
    c = load_config(tmp_path / "c.yaml", ["seeds=[1,2,3]", "mask_rate=0.25", "epochs=9", "diagnostics=false"])
    assert c.seeds == (1, 2, 3) and c.mask_rate == 0.25 and c.epochs == 9 and c.model == "baseline"
    assert c.diagnostics is False
    assert load_config(None, ["lr_encoder=1e-3"]).lr_encoder == 1e-3  # YAML reads 1e-3 as a number here


@pytest.mark.parametrize("d, words", [
    ({"epochz": 3}, ["epochz", "did you mean 'epochs'"]),
    ({"epochs": "ten"}, ["epochs", "'ten'", "integer"]),
    ({"epochs": 0}, ["epochs=0", ">= 1"]),
    ({"mask_rate": 1.0}, ["mask_rate=1.0", "[0.0, 1.0)"]),
    ({"array_len": 1}, ["array_len=1"]),
    ({"loss": "hinge"}, ["loss='hinge'", "ranknet", "pointer_ce"]),
    ({"n_heads": 3}, ["n_heads=3", "d_model=128"]),
    ({"seeds": []}, ["seeds"]),
    ({"seeds": [1, 1]}, ["seeds", "distinct"]),
    ({"hrm_period": 0}, ["hrm_period=0"]),
    ({"diagnostics": "yes"}, ["diagnostics", "true or false"]),
    ({"temperature_min": 3.0}, ["temperature_min=3.0", "temperature_init"]),
    ({"precision": "fp16"}, ["precision='fp16'", "fp32", "bf16"]),
])
def test_bad_values_name_key_value_and_allowed(d, words):
    with pytest.raises(ConfigError) as e:
        from_dict(d)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("d, message", [
    ({"array_len": 513}, "array_len=513: must be in [2, 512]"),
    ({"mask_rate": -0.1}, "mask_rate=-0.1: must be in [0.0, 1.0)"),
    ({"temperature_decay": 0.0}, "temperature_decay=0.0: must be in (0.0, 1.0]"),
    ({"temperature_init": 0}, "temperature_init=0.0: must be > 0.0"),
    ({"weight_decay": -1e-3}, "weight_decay=-0.001: must be >= 0.0"),
    ({"threads": -1}, "threads=-1: must be >= 0"),
    ({"batch_size": 0}, "batch_size=0: must be >= 1"),
    ({"model": "pots"}, "model='pots': expected one of baseline, pot"),
    ({"cuda_graphs": 1}, "cuda_graphs=1: expected one of auto, off"),
    ({"entropy_reg": "x"}, "entropy_reg='x': expected a number"),
])
def test_the_allowed_values_of_a_key_are_its_fields_and_say_so(d, message):
    """Each key's choices and range are declared with its default (TrialConfig's fields);
    the message states them exactly."""
    with pytest.raises(ConfigError) as e:
        from_dict(d)
    assert str(e.value) == message


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        load_config(bad)
    unk = tmp_path / "unk.yaml"
    unk.write_text(yaml.safe_dump({"d_modle": 64}))
    with pytest.raises(ConfigError, match="unk.yaml: unknown config key 'd_modle'"):
        load_config(unk)
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")


def test_frozen():
    with pytest.raises(AttributeError):
        TrialConfig().epochs = 3  # type: ignore[misc]


def test_truncated_gradient_without_deep_supervision_is_refused():
    """grad_mode=last detaches the encoder's output after iteration 0, and deep_supervision=none
    gives iteration 0 no loss: the encoder could never learn, so the pair is an error."""
    with pytest.raises(ConfigError) as e:
        from_dict({"grad_mode": "last", "deep_supervision": "none"})
    assert "grad_mode='last'" in str(e.value) and "deep_supervision='none'" in str(e.value)
    from_dict({"grad_mode": "last", "deep_supervision": "uniform"})  # iteration 0 is supervised
    from_dict({"grad_mode": "full", "deep_supervision": "none"})  # gradient reaches the encoder
    from_dict({"model": "baseline", "grad_mode": "last", "deep_supervision": "none"})  # one pass


def test_precision_is_a_model_key_and_not_packable():
    from poh_tune.config import PACK_SHAREABLE, pack_key
    from poh_tune.model import ModelConfig

    c = from_dict({"precision": "bf16"})
    assert c.precision == "bf16" and ModelConfig.from_trial(c).precision == "bf16"
    assert "precision" not in PACK_SHAREABLE
    assert pack_key(c) != pack_key(c.replace(precision="fp32"))
