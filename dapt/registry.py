"""Models in MLflow: each pretrained variant logged as a transformers model and registered; the comparison's
verdict written on the versions, and an alias (`champion`) on the model the verdict favours.

Functions only, called from the stages' MLflow runs: `ingest` logs the general model, `pretrain` the domain
variants, `compare` records the verdict. Load the favoured model back with
`mlflow.transformers.load_model("models:/<registered_model>@champion")`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from huggingface_hub import ModelCard
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from transformers import pipeline

from dapt import tracking
from dapt.common import PARAMS_FILE, Section, log, read_params_file, validate_section

VARIANT_TAG = "variant"
VERDICT_PREFIX = "compare."  # version tags from the verdict: compare.<key of metrics/headline.json>
# the headline keys the alias decision and the tags need (see compare.headline), by the verdict's measure: f1 for
# classification, ndcg for retrieval
VERDICT_KEYS = ("verdict", "{m}_diff", "{m}_diff_ci_low", "{m}_diff_ci_high", "p_value", "{m}_domain", "{m}_general")
MEASURES = ("f1", "ndcg")


def measure(verdict: Mapping[str, Any]) -> str:
    """The verdict's measure prefix (f1, ndcg): the one whose difference the headline carries (f1 when none does)."""
    return next((m for m in MEASURES if f"{m}_diff" in verdict), MEASURES[0])


class RegistryParams(Section):
    """`registry:` in params.yaml. Not a DVC dependency of any stage: naming the registry reruns nothing."""

    registered_model: str | None = "dapt-encoder"
    alias: str = "champion"
    log_models: bool = True


def load_registry_params(path: Path = PARAMS_FILE) -> RegistryParams:
    """The `registry:` section (its defaults where params.yaml has none, or where there is no params.yaml)."""
    data = read_params_file(path, profile=False) if path.exists() else {}
    return validate_section(data, "registry", RegistryParams, path) if "registry" in data else RegistryParams()


def task_for(model_dir: Path) -> str:
    """The pipeline task a saved folder supports: fill-mask with an MLM head, else feature-extraction (a base
    encoder, e.g. a sentence-transformers MiniLM, has no head to predict tokens with)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if not architectures:
        raise ValueError(f"registry: {model_dir}/config.json names no `architectures`; save the model with "
                         "save_pretrained from a model class (e.g. BertForMaskedLM) so MLflow knows what to load")
    return "fill-mask" if architectures[0].endswith("ForMaskedLM") else "feature-extraction"


def pip_requirements() -> list[str]:
    """What loading the model needs, pinned to the installed versions. MLflow's default list adds torchvision,
    which an encoder does not need (and this project does not install), and fails without it."""
    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "transformers", "tokenizers")]


def log_variant(model_dir: Path, variant: str, registered_model: str | None, tags: Mapping[str, str],
                card_dir: Path | None = None) -> ModelInfo:
    """Log a save_pretrained folder (model + tokenizer) to the active run as an MLflow transformers model named
    `variant`, tagged `variant` and `tags` (e.g. the `data.<path>` md5s), and register it under
    `registered_model` with the same tags on the version (None: log only).

    The weights are written once, as safetensors. Returns the ModelInfo: `model_id`, `model_uri`, and
    `registered_model_version` (None when not registered)."""
    if mlflow.active_run() is None:
        raise RuntimeError("registry.log_variant: no active MLflow run; call it inside the stage's "
                           "tracking.stage_run(...)")
    all_tags = {**tags, VARIANT_TAG: variant}
    # absolute: MLflow looks a relative path like `models/domain` up as a hub repo id (and waits on the network)
    model_dir = Path(model_dir).resolve()
    task = task_for(model_dir)
    # a pipeline, not the folder's path: MLflow 3.17 can log a path without loading it, but that route fails on
    # transformers 5 (pipelines.check_task now names the class as a string). On the CPU: saving needs no GPU
    pipe = pipeline(task, model=str(model_dir), device="cpu")
    # a hub model's card, with its license, kept beside the weights; an adapted model carries its base model's
    # (`card_dir`). Without one MLflow looks the folder up on the hub as a repo id, and warns
    readme = next((d / "README.md" for d in (model_dir, card_dir) if d and (d / "README.md").exists()), None)
    info = mlflow.transformers.log_model(pipe, name=variant, task=task, tags=all_tags,
                                         model_card=ModelCard.load(readme) if readme else None,
                                         pip_requirements=pip_requirements())
    if registered_model:
        try:
            version = mlflow.register_model(info.model_uri, registered_model, tags=all_tags)
        except MlflowException as e:
            raise RuntimeError(f"registry: logged {variant} as {info.model_uri} but could not register it as "
                               f"{registered_model!r} ({e.message}); use a tracking server with a model registry "
                               "(a database-backed store), or set the registered model name to null to log only"
                               ) from e
        info.registered_model_version = int(version.version)
    return info


def latest_version(registered_model: str, variant: str, run_id: str | None = None) -> ModelVersion | None:
    """The newest version of `registered_model` tagged `variant` (and logged by run `run_id`, if given), or None
    when this tracking server has none."""
    query = f"name = '{registered_model}' AND tags.{VARIANT_TAG} = '{variant}'"
    if run_id:
        query += f" AND run_id = '{run_id}'"
    found = MlflowClient().search_model_versions(query, max_results=1, order_by=["version_number DESC"])
    return found[0] if found else None


def favoured(verdict: Mapping[str, Any]) -> str:
    """The variant the verdict favours: `domain` only when it is significantly better than `general` (compare's
    verdict is `better` and the 95% interval of domain - general macro-F1 or nDCG@10 lies above 0); otherwise `general`,
    since without evidence that adaptation pays the unchanged base model is the cheaper, safer choice.
    (`domain_novocab` is never favoured: the verdict compares domain with general only.)"""
    return "domain" if verdict["verdict"] == "better" and verdict[f"{measure(verdict)}_diff_ci_low"] > 0 else "general"


def record_verdict(registered_model: str, versions: Mapping[str, str | int], verdict: Mapping[str, Any],
                   alias: str = "champion", run_id: str | None = None) -> str:
    """Tag each variant's version (`versions`: variant -> version) with the comparison's numbers
    (`compare.<key>` for every key of `verdict`, compare's headline dict, plus `compare.run_id` and
    `compare.favoured`), and point `alias` at the favoured variant's version (see `favoured`).
    `run_id`: the comparison's run, by default the active one. Returns the favoured variant."""
    missing = [k for k in (key.format(m=measure(verdict)) for key in VERDICT_KEYS) if k not in verdict]
    if missing:
        raise ValueError(f"registry.record_verdict: the verdict lacks {missing}; pass compare's headline dict "
                         "(what metrics/headline.json holds)")
    winner = favoured(verdict)
    if winner not in versions:
        raise ValueError(f"registry.record_verdict: the verdict favours {winner}, which has no registered version "
                         f"here (got {sorted(versions)}); log and register it first (registry.log_variant)")
    run_id = run_id or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    tags = {**{f"{VERDICT_PREFIX}{k}": str(v) for k, v in verdict.items()}, f"{VERDICT_PREFIX}favoured": winner,
            **({f"{VERDICT_PREFIX}run_id": run_id} if run_id else {})}
    client = MlflowClient()
    for number in versions.values():
        for key, value in tags.items():
            client.set_model_version_tag(registered_model, str(number), key, value)
    client.set_registered_model_alias(registered_model, alias, str(versions[winner]))
    return winner


# ---------------------------------------------------------------------------------------------------
# what the stages call: `registry:` in params.yaml decides; a lost server never fails a stage (tracking.guarded)


def log_stage_model(model_dir: Path, variant: str, inputs: Iterable[Path] = (), tags: Mapping[str, str] | None = None,
                    card_dir: Path | None = None, params_path: Path = PARAMS_FILE) -> int | None:
    """The stage's model to its MLflow run as `registry:` says, tagged with the DVC md5s of the stage's `inputs`
    (`data.<path>`, from dvc.lock) and `tags`, with the model card (and license) of `card_dir` where it has none.
    Returns the registered version, if any."""
    rp = load_registry_params(params_path)
    if not rp.log_models:
        return None
    all_tags = {**tracking.data_version_tags(paths=inputs), **(tags or {})}
    info = tracking.guarded(log_variant, model_dir, variant, rp.registered_model, all_tags, card_dir)
    if info is not None:
        log.info("registry: %s logged as %s%s", variant, info.model_uri,
                 f", {rp.registered_model} version {info.registered_model_version}" if rp.registered_model else "")
    return info.registered_model_version if info is not None else None


def record_comparison(headline: Mapping[str, Any], run_ids: Mapping[str, str | None],
                      params_path: Path = PARAMS_FILE) -> str | None:
    """The comparison's verdict on the compared variants' versions and the alias on the favoured one. `run_ids`:
    variant -> the MLflow run that logged its model (ingest's for general, pretrain's for the others), so the
    versions are this pipeline's even on a server a team shares. Returns the favoured variant, or None (nothing
    registered, or not on this server: a warning says which)."""
    rp = load_registry_params(params_path)
    if not (rp.log_models and rp.registered_model):
        return None
    versions = {}
    for variant, run_id in run_ids.items():
        if not run_id:  # its stage ran untracked, or elsewhere: any version found would be another pipeline's
            continue
        found = tracking.guarded(latest_version, rp.registered_model, variant, run_id)
        if found is not None:
            versions[variant] = found.version
    winner = favoured(headline)
    if winner not in versions:
        log.warning("registry: no version of %s logged by this pipeline's run (%s) is on this tracking server, so "
                    "the alias %r is not set; rerun the stage that made it (`dvc repro -f` of ingest or pretrain) "
                    "against this server", winner, run_ids.get(winner), rp.alias)
        return None
    tracking.guarded(record_verdict, rp.registered_model, versions, headline, rp.alias)
    log.info("registry: %s@%s -> %s (version %s)", rp.registered_model, rp.alias, winner, versions[winner])
    return winner
