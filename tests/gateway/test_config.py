"""Config: the shipped example loads; wrong configs fail at start-up naming the field and problem."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from gateway.cli import main as iapo
from gateway.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml"


def test_example_config_loads():
    settings = load_config(EXAMPLE)
    assert settings.route("math").aggregator == "mv"
    assert settings.tier("free").max_n == 4


def write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["routes"][0].update(upstream="nope"), "routes.0.upstream 'nope' is not an upstream"),
    (lambda c: c["routes"][0].update(aggregator="best"), "routes.0.aggregator"),
    (lambda c: c["routes"][0]["start"].update(default={"prompt": "ghost", "n": 1}), "start.default.prompt 'ghost'"),
    (lambda c: c["tiers"][0].update(cost_weight=-1), "tiers.0.cost_weight"),
    (lambda c: c["tiers"][0].update(max_n=0), "tiers.0.max_n"),
    (lambda c: c.update(default_tier="gold"), "default_tier 'gold' is not a tier"),
    (lambda c: c["api_keys"][0].update(hash="plaintext-key"), "api_keys.0.hash"),
    (lambda c: c["routes"][0]["prompts"][0]["params"].update(temprature=1), "unknown decoding parameter"),
    (lambda c: c.update(surprise=1), "surprise"),
    (lambda c: c["upstreams"]["gpt"].update(timeout=0), "upstreams.gpt.timeout"),
    (lambda c: c["train"].update(estimator="magic"), "train.estimator"),
    (lambda c: c["train"].update(pull_size=0), "train.pull_size"),
    (lambda c: c["train"].update(estimator="subset", pull_size=4), "pull_size needs estimator 'pooled'"),
])
def test_wrong_config_names_field_and_problem(tmp_path, mutate, expected):
    data = yaml.safe_load(EXAMPLE.read_text())
    bad = copy.deepcopy(data)
    mutate(bad)
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, bad))
    assert expected in str(exc.value)


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IAPO_STORE__PATH", str(tmp_path / "other.db"))
    assert load_config(EXAMPLE).store.path == str(tmp_path / "other.db")


def test_serve_refuses_a_bad_config_at_start_up(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IAPO_CONFIG", "unset")
    data = yaml.safe_load(EXAMPLE.read_text())
    data["routes"][0]["upstream"] = "nope"
    assert iapo(["serve", "--config", str(write(tmp_path, data))]) == 2
    assert "routes.0.upstream" in capsys.readouterr().err
