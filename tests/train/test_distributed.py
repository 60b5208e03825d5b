"""memjax.train.distributed: the environment decides the start-up mode; nothing really starts
here except in the slow two-process test."""

import json
import os
import socket
import subprocess
import sys

import pytest

from memjax.train import distributed
from memjax.train.distributed import (COORDINATOR_VAR, DISTRIBUTED_VAR, NUM_PROCESSES_VAR,
                                      PROCESS_ID_VAR, ProcessInfo, initialize_args)

EXPLICIT = {COORDINATOR_VAR: "10.0.0.2:1234", NUM_PROCESSES_VAR: "4", PROCESS_ID_VAR: "3"}


def test_single_process_when_nothing_is_set():
    assert initialize_args({}) is None
    assert initialize_args({DISTRIBUTED_VAR: "0"}) is None
    assert initialize_args({DISTRIBUTED_VAR: ""}) is None


def test_automatic_on_tpu_pods():
    assert initialize_args({DISTRIBUTED_VAR: "1"}) == {}


def test_distributed_flag_must_be_0_or_1():
    with pytest.raises(ValueError, match="MEMJAX_DISTRIBUTED must be 1 .* got 'yes'"):
        initialize_args({DISTRIBUTED_VAR: "yes"})


def test_explicit_arguments():
    expected = {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}
    assert initialize_args(EXPLICIT) == expected
    assert initialize_args({**EXPLICIT, DISTRIBUTED_VAR: "1"}) == expected  # explicit wins


@pytest.mark.parametrize("missing", [[PROCESS_ID_VAR], [NUM_PROCESSES_VAR, PROCESS_ID_VAR],
                                     [COORDINATOR_VAR]])
def test_partial_explicit_settings_name_the_missing_variables(missing):
    env = {k: v for k, v in EXPLICIT.items() if k not in missing}
    with pytest.raises(ValueError) as error:
        initialize_args(env)
    message = str(error.value)
    assert f"but {', '.join(missing)} missing" in message
    assert "all set" in message


@pytest.mark.parametrize("override, match", [
    ({COORDINATOR_VAR: "10.0.0.2"}, "must be host:port"),
    ({COORDINATOR_VAR: "10.0.0.2:http"}, "must be host:port"),
    ({NUM_PROCESSES_VAR: "four"}, "MEMJAX_NUM_PROCESSES must be an integer; got 'four'"),
    ({NUM_PROCESSES_VAR: "0"}, "at least 1"),
    ({PROCESS_ID_VAR: "4"}, r"MEMJAX_PROCESS_ID must be in \[0, MEMJAX_NUM_PROCESSES = 4\); got 4"),
    ({PROCESS_ID_VAR: "-1"}, "MEMJAX_PROCESS_ID must be in"),
])
def test_malformed_explicit_settings(override, match):
    with pytest.raises(ValueError, match=match):
        initialize_args({**EXPLICIT, **override})


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting anything; resets the
    module's first-call record."""
    calls = []
    monkeypatch.setattr(distributed, "_started", None)
    monkeypatch.setattr(distributed.jax.distributed, "initialize",
                        lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    for name in (DISTRIBUTED_VAR, *distributed.EXPLICIT_VARS):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_initialize_is_a_no_op_for_one_process(fake_jax_distributed):
    assert distributed.initialize() == ProcessInfo(process_index=0, process_count=1)
    assert fake_jax_distributed == []
    assert distributed.is_main_process()


def test_initialize_reads_the_environment_once(fake_jax_distributed, monkeypatch):
    for name, value in EXPLICIT.items():
        monkeypatch.setenv(name, value)
    info = distributed.initialize()
    assert fake_jax_distributed == [
        {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}]
    assert isinstance(info, ProcessInfo)
    monkeypatch.setenv(DISTRIBUTED_VAR, "1")
    assert distributed.initialize() is info  # idempotent: nothing started again
    assert len(fake_jax_distributed) == 1


def test_initialize_automatic(fake_jax_distributed, monkeypatch):
    monkeypatch.setenv(DISTRIBUTED_VAR, "1")
    distributed.initialize()
    assert fake_jax_distributed == [{}]


def test_initialize_raises_before_starting_anything(fake_jax_distributed, monkeypatch):
    monkeypatch.setenv(NUM_PROCESSES_VAR, "2")
    with pytest.raises(ValueError, match="MEMJAX_COORDINATOR_ADDRESS, MEMJAX_PROCESS_ID missing"):
        distributed.initialize()
    assert fake_jax_distributed == [] and distributed._started is None


def test_initialize_leaves_an_already_started_system_alone(fake_jax_distributed, monkeypatch):
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setenv(DISTRIBUTED_VAR, "1")
    distributed.initialize()
    assert fake_jax_distributed == []


@pytest.mark.parametrize("chosen, expected", [(None, "gloo"), ("gloo", "gloo"), ("mpi", "mpi")])
def test_initialize_gives_cpu_collectives_an_implementation(fake_jax_distributed, monkeypatch,
                                                           chosen, expected):
    """Several CPU processes need cross-process collectives: gloo unless one is chosen."""
    option = "jax_cpu_collectives_implementation"
    previous = getattr(distributed.jax.config, option)
    distributed.jax.config.update(option, chosen)
    try:
        monkeypatch.setenv(DISTRIBUTED_VAR, "1")
        distributed.initialize()
        assert getattr(distributed.jax.config, option) == expected
    finally:
        distributed.jax.config.update(option, previous)


def test_single_process_leaves_cpu_collectives_alone(fake_jax_distributed):
    option = "jax_cpu_collectives_implementation"
    previous = getattr(distributed.jax.config, option)
    distributed.jax.config.update(option, None)
    try:
        distributed.initialize()
        assert getattr(distributed.jax.config, option) is None
    finally:
        distributed.jax.config.update(option, previous)


CHILD = """
import json, jax
from memjax.train import distributed
info = distributed.initialize()
print(json.dumps({"count": jax.process_count(), "index": jax.process_index(),
                  "info": [info.process_index, info.process_count],
                  "main": distributed.is_main_process()}))
"""


@pytest.mark.slow
def test_two_processes_on_localhost():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != DISTRIBUTED_VAR}
    env.update(JAX_PLATFORMS="cpu", **{COORDINATOR_VAR: f"127.0.0.1:{port}",
                                       NUM_PROCESSES_VAR: "2"})
    children = [subprocess.Popen([sys.executable, "-c", CHILD], env={**env, PROCESS_ID_VAR: str(i)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]
    results = []
    try:
        for child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            child.kill()
    assert [r["count"] for r in results] == [2, 2]
    assert {r["index"] for r in results} == {0, 1}
    assert all(r["info"] == [r["index"], 2] and r["main"] == (r["index"] == 0) for r in results)
