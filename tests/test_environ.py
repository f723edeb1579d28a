"""service/environ.py: typed readers of single variables, and the settings base that
ServeSettings and ControlConfig share; every error names the variable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from service.control.runners.kubernetes import K8sSettings
from service.control.settings import ControlConfig
from service.environ import Environ, EnvSettings, convert, to_size
from service.errors import InvalidArgument
from service.serving.settings import ServeSettings

pytestmark = pytest.mark.unit


def test_readers_give_defaults_for_unset_or_blank_variables():
    env = Environ({"MODELCTL_BLANK": "  "})
    assert env.int("MODELCTL_UNSET", 7) == 7 and env.int("MODELCTL_BLANK") is None
    assert env.float("MODELCTL_UNSET", 0.5) == 0.5
    assert env.bool("MODELCTL_BLANK", True) is True
    assert env.str("MODELCTL_UNSET", "x") == "x"
    assert env.choice("MODELCTL_UNSET", "auto", ("auto", "cpu")) == "auto"
    assert env.path("MODELCTL_UNSET") is None
    assert env.size("MODELCTL_UNSET", 1) == 1


def test_readers_parse_values():
    env = Environ({"A": " 12 ", "F": "0.25", "B": "Yes", "N": "off", "C": "cpu", "P": "/x/y", "S": "512Mi",
                   "T": " text "})
    assert env.int("A", minimum=1, maximum=12) == 12
    assert env.float("F", above=0) == 0.25
    assert env.bool("B") is True and env.bool("N", True) is False
    assert env.choice("C", "auto", ("auto", "cpu")) == "cpu"
    assert env.path("P") == Path("/x/y")
    assert env.size("S") == 512 * 2**20 and to_size("1G", "x") == 10**9 and to_size("2048", "x") == 2048
    assert env.str("T") == "text"


@pytest.mark.parametrize("call, message", [
    (lambda e: e.int("MODELCTL_X", minimum=1), "MODELCTL_X: must be an integer >= 1, got 'abc'"),
    (lambda e: e.int("MODELCTL_ZERO", minimum=1), "MODELCTL_ZERO: must be an integer >= 1, got '0'"),
    (lambda e: e.int("MODELCTL_ZERO", minimum=1, maximum=5), "MODELCTL_ZERO: must be an integer from 1 to 5, got '0'"),
    (lambda e: e.float("MODELCTL_X"), "MODELCTL_X: must be a number, got 'abc'"),
    (lambda e: e.float("MODELCTL_ZERO", above=0), "MODELCTL_ZERO: must be a number > 0, got '0'"),
    (lambda e: e.bool("MODELCTL_X"), "MODELCTL_X: must be true or false"),
    (lambda e: e.choice("MODELCTL_X", "a", ("a", "b")), "MODELCTL_X: must be one of a, b, got 'abc'"),
    (lambda e: e.size("MODELCTL_X"), "MODELCTL_X: expected a memory quantity such as 8Gi or 512Mi, got 'abc'"),
])
def test_every_error_names_the_variable(call, message):
    with pytest.raises(InvalidArgument) as info:
        call(Environ({"MODELCTL_X": "abc", "MODELCTL_ZERO": "0"}))
    assert info.value.message.startswith(message), info.value.message


def test_convert_refuses_bools_as_numbers_and_fractions_as_integers():
    assert convert("3", int, "v") == 3 and convert(3.0, int, "v") == 3
    assert convert("a:b", tuple[Path, ...], "v") == (Path("a"), Path("b"))
    assert convert("/p", Path | None, "v") == Path("/p")
    for raw, typ in ((True, int), (2.5, int), (True, float), ("", Path)):
        with pytest.raises(InvalidArgument, match="^v: must be"):
            convert(raw, typ, "v")


@dataclass(frozen=True)
class _Toy(EnvSettings):
    settings_kind = "toy"
    env_names = {"port": "MODELCTL_TOY_PORT"}

    port: int = 1
    ratio: float = 0.5

    def __post_init__(self):
        if self.port < 1:
            raise InvalidArgument(f"port must be >= 1, got {self.port}")


def test_settings_base_precedence_and_names():
    assert _Toy.env_var("port") == "MODELCTL_TOY_PORT" and _Toy.env_var("ratio") == "MODELCTL_RATIO"
    assert _Toy.from_env({}) == _Toy()
    assert _Toy.from_env({"MODELCTL_TOY_PORT": "5", "MODELCTL_RATIO": " "}) == _Toy(5, 0.5)
    assert _Toy.from_env({"MODELCTL_TOY_PORT": "5"}, port=6, ratio=None) == _Toy(6, 0.5)
    with pytest.raises(InvalidArgument, match="^unknown toy setting.s.: nope$"):
        _Toy.from_env({}, nope=1)
    # A range error of the dataclass names the variable when the value came from it ...
    with pytest.raises(InvalidArgument, match="^MODELCTL_TOY_PORT: port must be >= 1, got 0$"):
        _Toy.from_env({"MODELCTL_TOY_PORT": "0"})
    # ... and the setting when a caller gave it.
    with pytest.raises(InvalidArgument, match="^port must be >= 1, got 0$"):
        _Toy.from_env({}, port=0)


def test_the_service_settings_name_their_variables():
    with pytest.raises(InvalidArgument, match="^MODELCTL_WORKERS_PER_MODEL: must be an integer, got 'two'$"):
        ServeSettings.from_env({"MODELCTL_WORKERS_PER_MODEL": "two"})
    with pytest.raises(InvalidArgument, match="^MODELCTL_CONTROL_PORT: must be an integer, got 'x'$"):
        ControlConfig.from_env({"MODELCTL_CONTROL_PORT": "x"})
    with pytest.raises(InvalidArgument, match="^MODELCTL_POLL_S: poll_s must be > 0"):
        ControlConfig.from_env({"MODELCTL_POLL_S": "0"})
    with pytest.raises(InvalidArgument, match="^workers_per_model: must be an integer, got 'two'$"):
        ServeSettings.from_env({}, workers_per_model="two")
    with pytest.raises(InvalidArgument, match="^MODELCTL_K8S_SHM_MB: must be an integer >= 0, got '-1'$"):
        K8sSettings.from_env(None, {"MODELCTL_K8S_SHM_MB": "-1"})
    assert K8sSettings.from_env(None, {"MODELCTL_K8S_GPUS_PER_POD": " 2 ", "MODELCTL_K8S_TTL_S": ""}).gpus_per_pod == 2


def test_torch_threads_is_read_in_one_place():
    from service.environ import torch_threads

    assert torch_threads(environ={}) is None and torch_threads(4, environ={}) == 4
    assert torch_threads(4, environ={"MODELCTL_TORCH_THREADS": " 2 "}) == 2
    assert torch_threads(environ={"MODELCTL_TORCH_THREADS": "0"}) == 1  # at least one, as before
    with pytest.raises(InvalidArgument, match="MODELCTL_TORCH_THREADS"):
        torch_threads(environ={"MODELCTL_TORCH_THREADS": "two"})
