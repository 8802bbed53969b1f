"""The search space: parsing, bad input (ConfigError naming the key path, before any trial),
define-by-run sampling of a conditional space through a real Optuna study, replay of flat params."""
from __future__ import annotations

import math

import optuna
import pytest

import tune_standin as S
from bmray.actors.tune.space import SearchSpace, merge
from bmray.models.typed_config import ConfigError

SPACE = {
    "train.lr": {"loguniform": [1e-3, 1.0]},
    "delta": {"choice": [{"method": "lora", "rank": {"choice": [2, 4, 8]}},
                         {"method": "adapter", "bottleneck": {"int": [4, 16]}},
                         {"method": "bitfit"}]},
    "seed": {"choice": [0, 1]},
}


def test_define_by_run_draws_conditionals_only_on_their_branch():
    space = SearchSpace(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        overrides = space.sample(trial)
        params = trial.params
        method = params["delta"]
        seen.add(method)
        # a branch's own parameter is drawn on that branch only
        assert ("delta[lora].rank" in params) == (method == "lora")
        assert ("delta[adapter].bottleneck" in params) == (method == "adapter")
        assert 1e-3 <= params["train.lr"] <= 1.0
        # replaying the flat params gives the same nested overrides
        assert space.resolve(params) == overrides
        cfg = S.load_config(merge({"delta": {"method": "lora", "rank": 99}}, overrides))
        assert cfg.delta.method == method
        if method == "lora":
            assert cfg.delta.rank == params["delta[lora].rank"] in (2, 4, 8)
        elif method == "adapter":
            assert 4 <= cfg.delta.bottleneck <= 16
            assert cfg.delta.rank == 4     # the option replaced the section: base rank 99 gone
        study.tell(trial, 0.0)
    assert seen == {"lora", "adapter", "bitfit"}


def test_nested_sections_spell_dotted_keys_and_merge_keeps_siblings():
    space = SearchSpace({"train": {"lr": {"uniform": [0.1, 0.2]}}})
    assert [d.path for d in space.dists] == ["train.lr"]
    out = merge({"train": {"steps": 5, "lr": 1.0}}, space.resolve({"train.lr": 0.15}))
    assert out == {"train": {"steps": 5, "lr": 0.15}}


def test_probes_cover_every_option_and_both_ends():
    probes = list(SearchSpace(SPACE).probes())
    labels = [label for label, _ in probes]
    assert labels.count("train.lr") == 2
    assert "delta[lora]" in labels and "delta[adapter].bottleneck" in labels
    assert "delta[bitfit]" in labels
    lrs = sorted(o["train"]["lr"] for label, o in probes if label == "train.lr")
    assert math.isclose(lrs[0], 1e-3) and math.isclose(lrs[1], 1.0)
    bottlenecks = sorted(o["delta"]["bottleneck"] for label, o in probes
                         if label == "delta[adapter].bottleneck")
    assert bottlenecks == [4, 16]


@pytest.mark.parametrize("raw, message", [
    ({"train.lr": {"logunif": [1e-4, 1e-2]}}, "space.train.lr: unknown distribution 'logunif'"),
    ({"train.lr": {"loguniform": [1e-2, 1e-4]}}, "space.train.lr.loguniform: low must be below"),
    ({"train.lr": {"loguniform": [0.0, 1e-2]}}, "space.train.lr.loguniform: a log scale needs"),
    ({"train.lr": {"uniform": [0.1]}}, "space.train.lr.uniform: expected [low, high]"),
    ({"train.lr": {"uniform": ["a", 1]}}, "space.train.lr.uniform: expected a number"),
    ({"delta.rank": {"int": [2.5, 8]}}, "space.delta.rank.int: bounds must be integers"),
    ({"delta": {"choice": []}}, "space.delta.choice: expected a non-empty list"),
    ({"train.lr": 0.1}, "space.train.lr: expected a distribution"),
    ({"delta.rank": {"choice": [4, 4]}}, "space.delta.rank.choice: options repeat"),
    ({}, "space: expected a mapping"),
])
def test_bad_distributions_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        SearchSpace(raw)
    assert message in str(info.value)


@pytest.mark.parametrize("raw, message", [
    # not a field of the config (a typo)
    ({"train.lrr": {"loguniform": [1e-3, 1e-1]}}, "space.train.lrr: "),
    ({"trian.lr": {"loguniform": [1e-3, 1e-1]}}, "space.trian.lr: "),
    # a field inside one option of a conditional
    ({"delta": {"choice": [{"method": "lora", "rank": {"choice": [2]}},
                           {"method": "adapter", "bottlenek": {"choice": [8]}}]}},
     "space.delta[adapter]: "),
    # a value of the wrong type / a bad choice, caught by the config's own loader
    ({"train.steps": {"uniform": [1, 2]}}, "space.train.steps: "),
    ({"delta.method": {"choice": ["lora", "prefix"]}}, "space.delta.method: "),
])
def test_unknown_keys_and_bad_values_fail_validation(raw, message):
    space = SearchSpace(raw)
    with pytest.raises(ConfigError) as info:
        space.validate({"train": {"steps": 2}}, S.load_config)
    assert str(info.value).startswith(message), str(info.value)


def test_a_valid_space_validates():
    SearchSpace(SPACE).validate({"train": {"steps": 2}}, S.load_config)
