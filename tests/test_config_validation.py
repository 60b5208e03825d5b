"""Every numeric field of every config preset is range-checked at launch: set to 0, -1 or a huge
value it is either refused by a message naming the field, the value and what is allowed, or it
runs (the slow test trains the accepted values for two steps)."""

import copy
import glob

import pytest

from memjax.config import load_config
from memjax.config_validation import (MIXER_RULES, ConfigError, numeric_fields, validate_config)
from memjax.layers import MIXERS, mixer_options

CONFIGS = sorted(glob.glob("configs/*.py"))
HUGE = 10**12
PROBES = (0, -1, HUGE)
# Values that pass validation: each is a meaningful setting (0 = off / none / no window ...),
# or only makes a run longer (huge schedule values). The slow test runs the short ones.
ACCEPTED = {
    ("seed", 0), ("seed", HUGE), ("task.permutation_seed", 0), ("task.permutation_seed", HUGE),
    ("mesh.data", -1), ("mesh.fsdp", -1), ("mesh.tensor", -1),
    ("model.max_len", 0), ("model.mlp_ratio", 0.0), ("model.short_conv", 0),
    ("model.mixer.window", 0), ("model.mixer.persistent_tokens", 0), ("model.mixer.head_size", 0),
    ("model.mixer.capacity", 0.0), ("model.mixer.eidetic", 0),
    ("model.input_dim", 0), ("model.output_dim", 0),
    ("model.vocab_size", 0),  # regression: float inputs and outputs need no vocabulary
    ("train.warmup_steps", 0), ("train.weight_decay", 0.0), ("train.grad_clip", 0.0),
    ("train.b1", 0.0), ("train.b2", 0.0), ("train.target_accuracy", 0.0),
    ("train.steps", HUGE), ("train.log_every", HUGE), ("train.eval_every", HUGE),
    ("train.checkpoint_every", HUGE),
}
MEMORY = 24 * 2**30  # fixed, so the outcome does not depend on the machine running the test


def with_value(config, path: str, value):
    config = copy.deepcopy(config)
    config.unlock()
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    return config


def probes(original):
    return [float(v) if isinstance(original, float) else v for v in PROBES]


def accepted_probes(config):
    """`(path, value)` of the probes of `config` that validation accepts; asserts the others'
    messages name a field, the value and the allowed range."""
    accepted = []
    for path, original in numeric_fields(config):
        for value in probes(original):
            try:
                validate_config(with_value(config, path, value), MEMORY)
            except ConfigError as error:
                message = str(error)
                assert message.startswith("config."), message
                if message.startswith(f"config.{path} ="):  # (else a field derived from it)
                    assert repr(value) in message, message
                assert "allowed" in message or "must be" in message or "divide" in message, message
            else:
                accepted.append((path, value))
    return accepted


@pytest.mark.parametrize("path", CONFIGS)
def test_every_numeric_field_is_checked(path):
    config = load_config(path)
    validate_config(config, MEMORY)  # the preset itself is valid
    unexpected = set(accepted_probes(config)) - ACCEPTED
    assert not unexpected, f"accepted without a check that they run: {sorted(unexpected)}"


def test_every_numeric_mixer_option_has_a_rule():
    for name in MIXERS.names():
        for option, default in mixer_options(name).items():
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert option in MIXER_RULES, f"{name}.{option} has no range rule"


@pytest.mark.parametrize("spec, overrides, match", [
    ("configs/mqar.py", {"model.d_model": -5}, r"config.model.d_model = -5 is out of range: "
                                                r"allowed is an int in \[1, 65536\]"),
    ("configs/mqar.py:model=deltanet", {"model.mixer.chunk_size": 0},
     r"config.model.mixer.chunk_size = 0 is out of range"),
    ("configs/mqar.py:model=deltanet", {"model.mixer.num_heads": 3},
     r"config.model.mixer.num_heads = 3 does not divide config.model.d_model = 64"),
    ("configs/mqar.py:model=swa+deltanet", {"model.mixers.swa.window": -2},
     r"config.model.mixers.swa.window = -2 is out of range"),
    ("configs/mqar.py", {"train.lr": float("nan")}, r"config.train.lr = nan"),
    ("configs/mqar.py", {"model.d_model": 65536, "model.num_layers": 64}, r"GiB for parameters"),
])
def test_bad_values_name_field_value_and_range(spec, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(load_config(spec, overrides), MEMORY)


def test_the_command_line_refuses_before_writing(tmp_path):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "configs/mqar.py:smoke",
         "--workdir", str(tmp_path / "run"), "--config.model.d_model=-5"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "config.model.d_model = -5 is out of range" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "run").exists()


SMOKE = "configs/mqar.py:smoke"


@pytest.mark.slow
@pytest.mark.parametrize("path, value", [
    p for p in accepted_probes(load_config(SMOKE)) if p[1] != HUGE and not p[0].startswith("mesh.")])
def test_accepted_values_run(tmp_path, path, value):
    from memjax.train.trainer import train

    config = with_value(load_config(SMOKE), path, value)
    config.train.steps, config.train.warmup_steps = 3, min(config.train.warmup_steps, 1)
    config.train.eval_every = config.train.checkpoint_every = 3
    result = train(config, str(tmp_path / "run"))
    assert result["step"] == 3
