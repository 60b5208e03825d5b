"""Configs are locked: unknown keys, wrong types and unknown presets fail, naming the key."""

import subprocess
import sys

import pytest

from memjax.config import load_config, parse_arg


def test_parse_arg_values_flags_and_unknown_keys():
    assert parse_arg("model=deltanet,smoke,d_model=128", model="attention", smoke=False, d_model=64) == {
        "model": "deltanet", "smoke": True, "d_model": 128}
    with pytest.raises(ValueError, match="unknown config argument 'modle'"):
        parse_arg("modle=x", model="attention")
    with pytest.raises(ValueError, match="'d_model' needs a value"):
        parse_arg("d_model", d_model=64)


def test_mqar_presets_pick_the_mixer_and_its_options():
    config = load_config("configs/mqar.py:model=linear_attention")
    assert config.model.mixer.name == "linear_attention"
    assert set(config.model.mixer) == {"name", "num_heads", "chunk_size", "impl"}
    window = load_config("configs/mqar.py:model=sliding_window")
    assert (window.model.mixer.name, window.model.mixer.window) == ("attention", 16)
    with pytest.raises(KeyError, match="unknown mixer 'nope'"):
        load_config("configs/mqar.py:model=nope")


def test_mqar_mixtures_choose_train_and_test_segments():
    single = load_config("configs/mqar.py:T=256,pairs=16").task
    assert single.train_segments == ((256, 16, 20_000),) and single.test_segments == ((256, 16, 1_000),)
    ladder = load_config("configs/mqar.py:T=256,pairs=16,mixture=ladder").task
    assert ladder.train_segments == ((64, 4, 20_000), (128, 8, 20_000), (256, 16, 20_000))
    assert ladder.test_segments == ((64, 4, 1_000), (128, 8, 1_000), (256, 16, 1_000))
    zoology = load_config("configs/mqar.py:mixture=zoology").task
    assert zoology.train_segments[0] == (64, 4, 100_000) and len(zoology.train_segments) == 5
    assert zoology.test_segments[-1] == (1024, 256, 1_000) and len(zoology.test_segments) == 7
    with pytest.raises(ValueError, match="unknown mixture 'zoo'"):
        load_config("configs/mqar.py:mixture=zoo")


def test_overrides_are_type_checked_and_locked():
    assert load_config("configs/mqar.py:smoke", {"train.steps": 7}).train.steps == 7
    with pytest.raises(AttributeError, match="stepz"):
        load_config("configs/mqar.py:smoke", {"train.stepz": 7})
    with pytest.raises(TypeError, match="steps"):
        load_config("configs/mqar.py:smoke", {"train.steps": "many"})


def test_vocab_size_is_shared_by_task_and_model():
    config = load_config("configs/mqar.py:smoke", {"task.vocab_size": 128})
    assert config.model.vocab_size == 128


@pytest.mark.parametrize("override, expected", [
    ("--config.train.stepz=3", "config.train has no field 'stepz'"),
    ("--config.model.mixer.expand_k=2",  # a field of other mixers, not of attention
     "config.model.mixer has no field 'expand_k' (its fields: chunk_size, impl, name, num_heads, "
     "persistent_tokens, window)"),
    ("--config.train.steps=abc", "config.train.steps=abc"),
])
def test_command_line_rejects_bad_overrides(tmp_path, override, expected):
    run = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "configs/mqar.py:smoke",
         "--workdir", str(tmp_path / "run"), override], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert expected in run.stderr
    assert not (tmp_path / "run").exists()


def test_hybrid_pattern_sets_per_layer_mixers():
    config = load_config("configs/mqar.py:model=swa+gated_deltanet,smoke",
                         {"model.mixers.swa.window": 8})
    assert config.model.mixer is None and config.model.layers == "swa+gated_deltanet"
    assert (config.model.mixers.swa.name, config.model.mixers.gated_deltanet.name) == (
        "attention", "gated_deltanet")
    with pytest.raises(AttributeError, match="windw"):
        load_config("configs/mqar.py:model=swa+gated_deltanet", {"model.mixers.swa.windw": 8})


@pytest.mark.integration
def test_hybrid_pattern_trains_and_saves_its_layers(tmp_path):
    from memjax.train.trainer import train

    config = load_config("configs/mqar.py:model=swa+gated_deltanet,smoke",
                         {"model.mixers.swa.window": 8, "train.steps": 2,
                          "train.warmup_steps": 1})
    config.train.eval_every = config.train.checkpoint_every = 2
    result = train(config, str(tmp_path / "run"))
    assert result["step"] == 2 and 0 <= result["test/accuracy"] <= 1
    saved = (tmp_path / "run" / "config.json").read_text()
    assert '"layers": "swa+gated_deltanet"' in saved


def test_named_pattern_based_published_builds_its_layers():
    import jax
    import jax.numpy as jnp

    from memjax.config import LAYER_PATTERNS, lm_config, to_dict
    from memjax.models import build_model

    kinds = ["based", "swa", "base_conv", "base_conv", "base_conv"]
    cfg = lm_config(256, 64, "based_published", num_layers=5)
    assert cfg.layers == LAYER_PATTERNS["based_published"] == "+".join(kinds)
    assert cfg.mixer is None
    assert (cfg.mixers.based.window, cfg.mixers.swa.window) == (0, 64)
    assert (cfg.mixers.base_conv.expand, cfg.mixers.base_conv.conv_size) == (4, 3)
    model = build_model(to_dict(cfg))
    names = [m["name"] for m in model.layer_mixers()]
    assert names == ["based", "attention", "base_conv", "base_conv", "base_conv"]
    assert [m.get("window") for m in model.layer_mixers()[:2]] == [0, 64]
    tokens = jnp.zeros((2, 8), jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    assert model.apply(params, tokens).shape == (2, 8, 256)
    assert "mixer" in params["params"]["block_2"] and "short_conv" not in params["params"]["block_2"]
    with pytest.raises(ValueError, match="does not repeat evenly to num_layers = 4"):
        build_model(to_dict(lm_config(256, 64, "based_published", num_layers=4))).init(
            jax.random.key(0), tokens)
