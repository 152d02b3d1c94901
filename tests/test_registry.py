import pytest

from kdistill.errors import ConfigError
from kdistill.registry import Registry


def test_register_and_get():
    reg = Registry("thing")
    reg.register("hidden_mse")(42)
    assert reg.get("hidden_mse") == 42
    assert "hidden_mse" in reg and reg.names() == ["hidden_mse"]


def test_registering_twice_is_an_error():
    reg = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(2)


def test_unknown_name_suggests_closest_and_lists_valid():
    reg = Registry("loss")
    for name in ("hidden_mse", "attention_kl"):
        reg.register(name)(name)
    with pytest.raises(ConfigError) as err:
        reg.get("hiden_mse", "losses[0].type")
    msg = str(err.value)
    assert "losses[0].type" in msg and "did you mean 'hidden_mse'" in msg and "attention_kl" in msg
    with pytest.raises(ConfigError, match=r"a loss name at losses\[0\].type is one name \(a string\), got list"):
        reg.get(["hidden_mse"], "losses[0].type")  # YAML `type: [hidden_mse]`: not a TypeError from a set lookup
