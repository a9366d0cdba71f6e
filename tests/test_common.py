"""Params validation, atomic writes, and the shipped params.yaml."""

from pathlib import Path

import pytest

from stages.adapt_tokenizer import AdaptTokenizerParams
from stages.clean import CleanParams
from stages.common import ParamsError, atomic_path, load_params, load_paths, write_json
from stages.compare import CompareParams
from stages.finetune import FinetuneParams
from stages.ingest import IngestParams
from stages.pretrain import PretrainParams

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"ingest": IngestParams, "clean": CleanParams, "adapt_tokenizer": AdaptTokenizerParams,
            "pretrain": PretrainParams, "finetune": FinetuneParams, "compare": CompareParams}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_shipped_params_validate(section):
    load_params(section, SECTIONS[section], ROOT / "params.yaml")
    load_paths(ROOT / "params.yaml")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "clean: {min_words: 3, max_words: 9, valid_fraction: 0.1, max_valid_docs: 5,"
                           " general_max_docs: 5, min_wrods: 4}\n")
    with pytest.raises(ParamsError, match=r"params.yaml: clean.min_wrods: Extra inputs are not permitted"):
        load_params("clean", CleanParams, path)


def test_bad_value_names_key_and_range(tmp_path):
    path = write(tmp_path, "clean: {min_words: 3, max_words: 9, valid_fraction: 0.9, max_valid_docs: 5,"
                           " general_max_docs: 5}\n")
    with pytest.raises(ParamsError, match=r"clean.valid_fraction: Input should be less than 0.5 \(got 0.9\)"):
        load_params("clean", CleanParams, path)


def test_cross_field_check(tmp_path):
    import yaml

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["pretrain"]["mask_replace_prob"] = 0.95
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ParamsError, match="mask_replace_prob \\+ pretrain.random_replace_prob must not exceed 1"):
        load_params("pretrain", PretrainParams, path)


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="missing section 'clean'"):
        load_params("clean", CleanParams, write(tmp_path, "paths: {}\n"))
    with pytest.raises(ParamsError, match="params.yaml: invalid YAML"):
        load_params("clean", CleanParams, write(tmp_path, "clean: [unclosed\n"))


def test_atomic_path_keeps_old_output_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp leftovers


def test_atomic_path_replaces_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]


def test_gpu_profile_only_sets_existing_params():
    """`dvc exp run -S` refuses keys that params.yaml lacks; `make run-gpu` must not hit that."""
    import re

    import yaml

    makefile = (ROOT / "Makefile").read_text()
    keys = re.findall(r"-S '?([\w.]+)=", makefile)
    assert len(keys) >= 10
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in keys:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"make run-gpu sets {key}, which params.yaml lacks"
            node = node[part]
