"""The serving config: typed, unknown keys and bad values named by key path, before Ray starts;
the two config files (bmray serve's YAML and Ray Serve's) describe the same app."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from bmray.actors.serve.app import build_app
from bmray.actors.train import checkpoints as ckpt
from bmray.actors.serve.config import (ServeAppConfig, api_key, check_serve_config,
                                       resolve_paths, serve_config_from_dict)
from bmray.models.retrieval.artifact import save_index
from bmray.models.retrieval.bm25 import BM25Index
from bmray.models.typed_config import ConfigError
from tests.conftest import tiny_gpt_experiment

REPO = Path(__file__).resolve().parents[3]


def local() -> dict:
    return yaml.safe_load((REPO / "configs/serve_local.yaml").read_text())


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    index = BM25Index.build(["a", "b"], ["apple banana", "banana cherry"])
    return str(save_index(index, tmp_path_factory.mktemp("idx") / "tiny"))


def test_the_local_config_parses_to_the_documented_deployment_options():
    cfg = serve_config_from_dict(local())
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and cfg.api_key_env is None
    opts = cfg.search.options()
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2,
                                          "target_ongoing_requests": 4.0}
    assert "num_replicas" not in opts
    assert opts["max_queued_requests"] == 64 and opts["max_ongoing_requests"] == 16
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 1.0}
    assert cfg.embed.options()["num_replicas"] == 1
    assert opts["ray_actor_options"] == {"num_cpus": 0.5}


def test_the_serve_config_file_is_ray_serves_schema_with_the_same_app():
    raw = yaml.safe_load((REPO / "configs/serve_app.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)            # Ray's own validation
    app = schema.applications[0]
    assert app.import_path == "bmray.actors.serve.app:build_app"
    want = local()
    assert raw["http_options"] == {"host": want.pop("host"), "port": want.pop("port")}
    assert app.args == want                                   # one app, two entry points


@pytest.mark.parametrize("patch,path", [
    ({"porrt": 1}, "config: unknown key(s) ['porrt']"),
    ({"search": {"replicas": 0}}, "config.search.replicas"),
    ({"search": {"max_queued_requests": 0}}, "config.search.max_queued_requests"),
    ({"search": {"max_batch_size": "big"}}, "config.search.max_batch_size"),
    ({"search": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}},
     "config.search.autoscaling.max_replicas"),
    ({"search": {"autoscaling": {"target": 2}}}, "config.search.autoscaling: unknown key"),
    ({"search": {"replicas": 2, "autoscaling": {}}}, "config.search.replicas"),
    ({"embed": {"enabled": "yes"}}, "config.embed.enabled"),
    ({"embed": {"replica": 1}}, "config.embed: unknown key(s) ['replica']"),
    ({"ingress": {"max_batch_size": 4}}, "config.ingress: unknown key(s) ['max_batch_size']"),
    ({"port": 70000}, "config.port"),
    ({"host": "0.0.0.0"}, "config.api_key_env"),
    ({"api_key_env": "sk-live-123"}, "config.api_key_env"),
    ({"indexes": {"bad name": "x"}}, "config.indexes.bad name"),
    ({"indexes": {}, "embed": {"enabled": False}}, "config.indexes"),
    ({"generate": {"enabled": True, "experiment": None}}, "config.generate.experiment"),
    ({"generate": {"enabled": "on"}}, "config.generate.enabled"),
    ({"generate": {"max_batch_size": 0}}, "config.generate.max_batch_size"),
    ({"generate": {"model": "x"}}, "config.generate: unknown key(s) ['model']"),
])
def test_bad_keys_and_values_name_the_key_path(patch, path):
    raw = {**local(), **patch}
    with pytest.raises(ConfigError) as err:
        serve_config_from_dict(raw)
    assert str(err.value).startswith(path), str(err.value)


def test_a_public_host_needs_a_key_or_an_explicit_opt_out():
    serve_config_from_dict({**local(), "host": "0.0.0.0", "api_key_env": "BMRAY_API_KEY"})
    serve_config_from_dict({**local(), "host": "0.0.0.0", "allow_unauthenticated": True})


def test_artifacts_and_the_key_variable_are_checked(index_dir, tmp_path, monkeypatch):
    cfg = serve_config_from_dict({**local(), "indexes": {"tiny": index_dir}})
    check_serve_config(cfg)
    missing = serve_config_from_dict({**local(), "indexes": {"gone": str(tmp_path / "no")}})
    with pytest.raises(ConfigError, match=r"^indexes\.gone: .*no such index directory"):
        check_serve_config(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^indexes\.e: .*no manifest.json"):
        check_serve_config(serve_config_from_dict({**local(),
                                                   "indexes": {"e": str(tmp_path / "empty")}}))
    keyed = serve_config_from_dict({**local(), "indexes": {"tiny": index_dir},
                                    "api_key_env": "BMRAY_TEST_KEY_X"})
    monkeypatch.delenv("BMRAY_TEST_KEY_X", raising=False)
    with pytest.raises(ConfigError, match="BMRAY_TEST_KEY_X must hold the API key.*unset"):
        check_serve_config(keyed)
    monkeypatch.setenv("BMRAY_TEST_KEY_X", "short")
    with pytest.raises(ConfigError, match="too short"):
        api_key(keyed)
    monkeypatch.setenv("BMRAY_TEST_KEY_X", "k" * 32)
    assert api_key(keyed) == "k" * 32


def test_relative_index_paths_resolve_against_the_base(tmp_path):
    cfg = resolve_paths(serve_config_from_dict({**local(), "indexes": {"m": "runs/x"}}), tmp_path)
    assert cfg.indexes == {"m": str(tmp_path / "runs/x")}
    assert isinstance(cfg, ServeAppConfig)


def test_build_app_checks_its_args_like_the_yaml(index_dir):
    args = {k: v for k, v in local().items() if k not in ("host", "port")}
    with pytest.raises(ConfigError, match=r"^args\.search\.replicas"):
        build_app({**args, "search": {"replicas": -1}})
    with pytest.raises(ConfigError, match=r"^indexes\.medline"):
        build_app({**args, "indexes": {"medline": "/nonexistent/medline"}})
    app = build_app({**args, "indexes": {"tiny": index_dir}})
    assert type(app).__name__ == "Application"


def tiny_gpt(root: Path) -> dict:
    """A 1-step tiny GPT pre-training experiment (mapping) run in ``root``."""
    return tiny_gpt_experiment(root, "Shall I compare thee to a summer's day?\n" * 20,
                               block_len=17, batch=2, steps=1)[0]


def test_the_generation_checkpoint_is_checked_naming_the_key(tmp_path, monkeypatch):
    raw = tiny_gpt(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(raw))

    def check(**generate):
        cfg = serve_config_from_dict({**local(), "indexes": {},
                                      "generate": {"enabled": True, **generate}})
        check_serve_config(resolve_paths(cfg, tmp_path))

    check(experiment=str(exp))
    monkeypatch.chdir(tmp_path)
    check(experiment="exp.yaml", checkpoint="ckpt")          # relative to the base
    with pytest.raises(ConfigError, match=r"^generate\.experiment: no pre-training experiment"):
        check(experiment="nothing.yaml")
    with pytest.raises(ConfigError, match=r"^generate\.checkpoint: no checkpoint at"):
        check(experiment=str(exp), checkpoint=str(tmp_path / "gone"))
    bert = str(tmp_path / "bert")
    ckpt.save_checkpoint(bert, 1, {"model": {}}, manifest={"model_config": {
        "family": "bert", "vocab_size": 300}})
    with pytest.raises(ConfigError, match=r"^generate\.checkpoint: .*family 'bert'"):
        check(experiment=str(exp), checkpoint=bert)
    no_tok = tmp_path / "no_tok.yaml"
    no_tok.write_text(yaml.safe_dump({**raw, "data": {**raw["data"],
                                                      "pack_dir": str(tmp_path / "none")}}))
    with pytest.raises(ConfigError, match=r"^generate\.experiment: no tokenizer at"):
        check(experiment=str(no_tok))
    small = str(tmp_path / "small")
    ckpt.save_checkpoint(small, 1, {"model": {}}, manifest={"model_config": {
        "family": "gpt", "vocab_size": 10}})
    with pytest.raises(ConfigError, match=r"^generate\.experiment: .*another model's"):
        check(experiment=str(exp), checkpoint=small)
