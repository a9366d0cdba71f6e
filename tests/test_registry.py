"""registry: variants logged as MLflow transformers models, registered, tagged with the verdict, aliased, loaded
back."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from transformers import AutoModel, AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertModel

from dapt import registry
from tests.conftest import TINY, wordpiece_tokenizer

NAME = "dapt-encoder"
ADDED = ["licensee", "redistribution"]  # the domain tokenizer's added tokens, as adapt_tokenizer adds them
SIGNIFICANT = {"verdict": "better", "f1_domain": 0.61, "f1_general": 0.55, "f1_diff": 0.06, "f1_diff_ci_low": 0.02,
               "f1_diff_ci_high": 0.10, "p_value": 0.004, "far_below_recipe": False}
NOT_SIGNIFICANT = {**SIGNIFICANT, "verdict": "no difference", "f1_diff": 0.01, "f1_diff_ci_low": -0.03,
                   "p_value": 0.4}


def general_folder(path: Path) -> Path:
    """A base encoder without an MLM head, with a hub-style model card, like the demo's MiniLM."""
    tok = wordpiece_tokenizer()
    BertModel(BertConfig(vocab_size=len(tok), **TINY)).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A tiny base encoder\n")
    return path


def domain_folder(path: Path) -> Path:
    """A masked-LM with an adapted tokenizer (added tokens, resized embeddings), as pretrain saves it."""
    tok = wordpiece_tokenizer()
    tok.add_tokens(ADDED)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok) - len(ADDED), **TINY))
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite tracking store with two registered variants (and one logged only), logged by one run."""
    root = tmp_path_factory.mktemp("registry")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    experiment = mlflow.create_experiment("dapt", artifact_location=(root / "mlartifacts").as_uri())
    folders = {"general": general_folder(root / "general"), "domain": domain_folder(root / "domain")}
    with mlflow.start_run(experiment_id=experiment) as run:
        # the adapted model carries its base model's card, as pretrain logs it
        infos = {v: registry.log_variant(folders[v], v, NAME, {"data.models/" + v: f"md5-{v}"},
                                         card_dir=folders["general"]) for v in folders}
        unregistered = registry.log_variant(folders["domain"], "domain_novocab", None, {})
    yield {"root": root, "folders": folders, "infos": infos, "unregistered": unregistered, "run_id": run.info.run_id}
    mlflow.set_tracking_uri(previous)


def test_task_for_picks_fill_mask_only_with_an_mlm_head(tmp_path):
    for arch, task in [("BertForMaskedLM", "fill-mask"), ("BertModel", "feature-extraction")]:
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
        assert registry.task_for(tmp_path) == task
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="architectures"):
        registry.task_for(tmp_path)


def test_log_variant_registers_versions_with_variant_and_data_tags(store):
    client = MlflowClient()
    for variant, info in store["infos"].items():
        version = client.get_model_version(NAME, str(info.registered_model_version))
        assert version.tags == {"variant": variant, f"data.models/{variant}": f"md5-{variant}"}
        assert version.run_id == store["run_id"] and version.source == info.model_uri
        assert mlflow.get_logged_model(info.model_id).tags["variant"] == variant
    assert store["unregistered"].registered_model_version is None
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2


def test_logged_model_holds_one_safetensors_copy_and_the_card(store):
    local = {v: Path(mlflow.artifacts.download_artifacts(i.model_uri)) for v, i in store["infos"].items()}
    for variant, path in local.items():
        weights = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")]
        assert weights == ["model/model.safetensors"], variant
    for variant in ("general", "domain"):  # from its README; the domain model's from its base model's
        assert yaml.safe_load((local[variant] / "model_card_data.yaml").read_text())["license"] == "apache-2.0"


def test_latest_version_by_variant_and_run(store):
    versions = {v: str(i.registered_model_version) for v, i in store["infos"].items()}
    assert str(registry.latest_version(NAME, "domain").version) == versions["domain"]
    assert str(registry.latest_version(NAME, "general", store["run_id"]).version) == versions["general"]
    assert registry.latest_version(NAME, "general", "0" * 32) is None       # another run's
    assert registry.latest_version(NAME, "domain_novocab") is None          # logged, never registered
    assert registry.latest_version("no-such-model", "domain") is None


@pytest.mark.parametrize("verdict, winner", [(SIGNIFICANT, "domain"), (NOT_SIGNIFICANT, "general")])
def test_record_verdict_tags_versions_and_aliases_the_favoured(store, verdict, winner):
    versions = {v: i.registered_model_version for v, i in store["infos"].items()}
    assert registry.record_verdict(NAME, versions, verdict, run_id="cmp-run") == winner
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(versions[winner])
    for version in versions.values():
        tags = client.get_model_version(NAME, str(version)).tags
        assert tags["compare.verdict"] == verdict["verdict"]
        assert float(tags["compare.f1_diff_ci_low"]) == verdict["f1_diff_ci_low"]
        assert tags["compare.favoured"] == winner and tags["compare.run_id"] == "cmp-run"


def test_favoured_needs_a_significant_win_with_the_interval_above_zero():
    assert registry.favoured(SIGNIFICANT) == "domain"
    assert registry.favoured({**SIGNIFICANT, "verdict": "worse", "f1_diff": -0.06}) == "general"
    assert registry.favoured({**SIGNIFICANT, "f1_diff_ci_low": -0.01}) == "general"  # interval reaches 0


def test_record_verdict_rejects_a_partial_verdict_or_a_missing_favourite(store):
    with pytest.raises(ValueError, match="lacks"):
        registry.record_verdict(NAME, {"general": 1}, {"verdict": "better"})
    with pytest.raises(ValueError, match="favours domain"):
        registry.record_verdict(NAME, {"general": 1}, SIGNIFICANT)


def test_champion_loads_back_with_its_tokenizer(store):
    versions = {v: i.registered_model_version for v, i in store["infos"].items()}
    registry.record_verdict(NAME, versions, SIGNIFICANT, run_id="cmp-run")
    pipe = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    assert pipe.task == "fill-mask"
    assert set(ADDED) <= set(pipe.tokenizer.get_added_vocab())
    assert len(pipe("the licensee may [MASK] the software.")) == 5  # fill-mask predicts its top 5
    original = AutoModelForMaskedLM.from_pretrained(store["folders"]["domain"])
    ids = pipe.tokenizer("the licensee may redistribution", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(pipe.model(**ids).logits, original(**ids).logits)


def test_general_without_mlm_head_loads_back_as_an_encoder(store):
    pipe = mlflow.transformers.load_model(f"models:/{NAME}/{store['infos']['general'].registered_model_version}")
    assert pipe.task == "feature-extraction"
    features = torch.tensor(pipe("the cat sat on the mat"))
    original = AutoModel.from_pretrained(store["folders"]["general"])
    ids = pipe.tokenizer("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(features, original(**ids).last_hidden_state, atol=1e-5)


def test_log_variant_needs_an_active_run(store):
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        registry.log_variant(store["folders"]["general"], "general", NAME, {})


def test_registration_failure_names_the_logged_model_and_the_fix(store, monkeypatch):
    def no_registry(*args, **kwargs):
        raise MlflowException("this server has no model registry")
    monkeypatch.setattr(mlflow, "register_model", no_registry)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("dapt").experiment_id), \
            pytest.raises(RuntimeError, match=r"could not register it as 'dapt-encoder'.*null to log only"):
        registry.log_variant(store["folders"]["general"], "general", NAME, {})


def test_favoured_reads_a_retrieval_verdict_by_its_ndcg_keys():
    ndcg = {"verdict": "better", "ndcg_diff": 0.04, "ndcg_diff_ci_low": 0.01, "ndcg_diff_ci_high": 0.07,
            "p_value": 0.01, "ndcg_domain": 0.6, "ndcg_general": 0.56}
    assert registry.favoured(ndcg) == "domain"
    assert registry.favoured({**ndcg, "ndcg_diff_ci_low": -0.01}) == "general"
