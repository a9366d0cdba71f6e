"""End to end on your own files: the whole DAG with `ingest.source: files` on a small curated corpus, with a
retrieval task in a BEIR folder and both TAPT variants.

The corpus is generated here: a few hundred distinct clinical-cardiology paragraphs (no exact or near
duplicates: clean's near-dedup step finds nothing to remove, which once crashed it), a retrieval task (referral
letters searching clinic guidelines, one guideline per finding) and no general text (ingest then uses the demo's
offline general English), cleaned with the `scientific` preset. The tiny random BERT is the smoke's
(`tests/smoke.py`) and so are the budgets, here as a named profile (`profile: tiny`) over the recipe's sections,
as a user runs one; one `dvc repro` serves every test here. Classification from files is covered stage by stage
(tests/test_ingest.py) and end to end by the demo (tests/test_e2e.py).
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
from pathlib import Path

import pytest
import yaml

from tests.smoke import SMOKE_PARAMS, deep_update, make_workspace, repro

pytestmark = pytest.mark.e2e

VARIANTS = ["general", "domain", "tapt", "dapt_tapt"]
TAPT = {"tapt": "domain_novocab_init", "dapt_tapt": "domain"}
SEEDS = SMOKE_PARAMS["finetune"]["seeds"]
N_DOCS = 300
SPLIT_QUERIES = {"train": 90, "dev": 24, "test": 36}

# ---------------------------------------------------------------------------------------------------
# a synthetic domain: clinical cardiology. Every sentence template is used at most once per document and its
# slots draw from long lists, so two documents share few word 5-grams (checked below)

FILL = {
    "condition": ["atrial fibrillation", "heart failure with reduced ejection fraction", "aortic stenosis",
                  "hypertrophic cardiomyopathy", "dilated cardiomyopathy", "mitral regurgitation", "pericarditis",
                  "infective endocarditis", "ventricular tachycardia", "sinus bradycardia", "pulmonary hypertension",
                  "unstable angina", "myocardial infarction", "coronary artery disease", "atrial flutter",
                  "tricuspid regurgitation", "cardiac amyloidosis", "myocarditis", "Takotsubo syndrome",
                  "complete heart block", "supraventricular tachycardia", "peripartum cardiomyopathy"],
    "drug": ["apixaban", "rivaroxaban", "warfarin", "bisoprolol", "metoprolol", "sacubitril", "valsartan",
             "spironolactone", "eplerenone", "dapagliflozin", "empagliflozin", "amiodarone", "digoxin",
             "furosemide", "atorvastatin", "rosuvastatin", "ticagrelor", "clopidogrel", "ivabradine",
             "colchicine", "verapamil", "dofetilide"],
    "procedure": ["transthoracic echocardiography", "coronary angiography", "catheter ablation",
                  "percutaneous coronary intervention", "transcatheter aortic valve implantation",
                  "cardiac magnetic resonance imaging", "Holter monitoring", "exercise stress testing",
                  "electrophysiology study", "pericardiocentesis", "implantable defibrillator placement",
                  "cardiac resynchronisation therapy", "left atrial appendage occlusion", "coronary bypass grafting",
                  "right heart catheterisation", "myocardial perfusion scintigraphy", "endomyocardial biopsy"],
    "marker": ["troponin", "natriuretic peptide", "ejection fraction", "creatinine clearance", "potassium",
               "QT interval", "pulmonary artery pressure", "left ventricular mass", "heart rate variability",
               "global longitudinal strain", "C-reactive protein", "haemoglobin", "diastolic function"],
    "group": ["elderly patients", "women under fifty", "patients with diabetes", "recent smokers",
              "patients on dialysis", "athletes", "patients after surgery", "people with obesity",
              "patients with chronic kidney disease", "survivors of cardiac arrest", "pregnant patients",
              "patients with prior stroke", "outpatients in rural clinics", "adolescents with congenital defects"],
    "outcome": ["readmission", "all-cause mortality", "stroke", "major bleeding", "symptom burden",
                "exercise capacity", "quality of life", "hospital length of stay", "recurrent arrhythmia",
                "sudden cardiac death", "functional class", "renal decline"],
    "adverb": ["markedly", "modestly", "consistently", "unexpectedly", "gradually", "sharply", "slightly",
               "steadily", "substantially", "transiently"],
    "verb": ["reduced", "increased", "stabilised", "worsened", "improved", "delayed", "predicted", "lowered"],
    "place": ["the coronary care unit", "a tertiary referral centre", "the emergency department",
              "a district hospital", "the heart failure clinic", "a community practice", "the cardiac ward",
              "an academic registry", "the rehabilitation programme", "a regional network"],
}
SENTENCES = [
    "In {place}, {procedure} {adverb} {verb} the risk of {outcome} among {group}.",
    "Treatment with {drug} {adverb} {verb} {marker} in {group} with {condition}.",
    "Clinicians should consider {procedure} when {condition} persists despite {drug}.",
    "The registry followed {number} {group} for {months} months and recorded {outcome}.",
    "{drug_cap} was stopped after {marker} {verb} {adverb} during the second week.",
    "Guidelines recommend {procedure} for {group} presenting with {condition}.",
    "Combining {drug} with {drug2} {verb} {outcome} but raised concern about {outcome2}.",
    "Serial measurement of {marker} helps to separate {condition} from {condition2}.",
    "At {place}, {number} referrals for {condition} were reviewed by two cardiologists.",
    "Among {group}, {condition} was {adverb} linked to {outcome} over {months} months.",
    "Before {procedure}, the team checked {marker} and adjusted the dose of {drug}.",
    "The trial randomised {number} {group} to {drug} or placebo and measured {outcome}.",
    "Late {procedure} {adverb} {verb} {marker} compared with early {procedure2}.",
    "Nurses at {place} taught {group} to recognise warning signs of {condition}.",
    "A rise in {marker} often precedes {outcome} in {condition}.",
    "Few studies have examined {drug} in {group}, so the evidence for {condition} is thin.",
    "When {condition} coexists with {condition2}, {procedure} carries a higher risk of {outcome}.",
    "The median {marker} fell from {number} to {number2} units after {months} months of {drug}.",
    "Referral to {place} shortened the time to {procedure} for {group}.",
    "Cost analyses suggest that {procedure} is worthwhile for {group} with {condition}.",
    "Side effects of {drug} {verb} adherence in {group}, especially those with {condition}.",
    "Imaging with {procedure} revealed {condition} that had been missed on the initial assessment.",
]
# the referral task (a separate template set, so no test text shares a 13-gram with the corpus)
TASK = {
    "rhythm": ["palpitations and an irregular pulse", "syncope after exertion", "a pause on the monitor",
               "fast regular palpitations", "dizziness with a slow pulse", "a broad complex tachycardia"],
    "failure": ["breathlessness when lying flat", "ankle swelling and weight gain", "a low ejection fraction",
                "fatigue and reduced exercise tolerance", "a raised natriuretic peptide", "crackles at both bases"],
    "ischaemia": ["chest tightness on climbing stairs", "a raised troponin", "pain radiating to the left arm",
                  "ST depression on the exercise test", "angina despite nitrates", "a new regional wall defect"],
}
REFERRALS = [
    "Please see this {age} year old {who} with {finding}; {history}.",
    "{who_cap}, aged {age}, reports {finding} since {when}, and {history}.",
    "Referral: {finding} noted at the {visit} visit in a {who} of {age}; {history}.",
    "Kindly review a {who} aged {age} who developed {finding} {when_rel}; {history}.",
]
HISTORY = ["no previous cardiac history", "a background of hypertension", "treated diabetes",
           "a family history of sudden death", "a smoking history of twenty years", "known renal impairment",
           "recent influenza", "a prior hip replacement", "well controlled asthma", "thyroid disease on treatment"]
WHO = ["woman", "man", "retired teacher", "farmer", "office worker", "lorry driver", "nurse", "student"]
WHEN = ["last winter", "the spring", "a recent holiday", "early this month", "the new year", "a viral illness"]
VISIT = ["routine", "pre-operative", "annual", "emergency", "follow-up", "occupational"]


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation, as near-dedup shingles them."""
    return re.findall(r"[a-z0-9]+", text.lower())


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def sentence(rng: random.Random, template: str) -> str:
    """`template` with its slots filled; a slot ending in 2 differs from its plain twin."""
    def pick(slot: str) -> str:
        return rng.choice(FILL[slot])
    values = {slot: pick(slot) for slot in FILL}
    values.update({f"{slot}2": rng.choice([v for v in FILL[slot] if v != values[slot]])
                   for slot in ("drug", "outcome", "condition", "procedure")})
    values.update(number=rng.randint(12, 980), number2=rng.randint(12, 980), months=rng.randint(3, 60),
                  drug_cap=values["drug"].capitalize())
    text = template.format(**values)
    return text[0].upper() + text[1:]


def domain_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` distinct paragraphs of 7-10 sentences, each template at most once in a paragraph."""
    rng = random.Random(seed)
    return [" ".join(sentence(rng, t) for t in rng.sample(SENTENCES, rng.randint(7, 10))) for _ in range(n)]


def referrals(n_per_class: int, seed: int) -> list[dict]:
    """Referral letters, `n_per_class` of each class, shuffled, with the finding each names (`doc`: the guideline
    that answers it)."""
    rng = random.Random(seed)
    out = []
    for label, findings in TASK.items():
        for _ in range(n_per_class):
            who, j = rng.choice(WHO), rng.randrange(len(findings))
            text = rng.choice(REFERRALS).format(
                age=rng.randint(19, 91), who=who, who_cap=f"A {who}", finding=findings[j],
                history=rng.choice(HISTORY), when=rng.choice(WHEN), visit=rng.choice(VISIT),
                when_rel=f"after {rng.choice(WHEN)}")
            out.append({"text": text, "label": label, "doc": f"{label}-{j}"})
    rng.shuffle(out)
    return out


def guidelines(seed: int) -> list[dict]:
    """One clinic guideline per finding (BEIR corpus rows): the documents the referrals search."""
    rng = random.Random(seed)
    return [{"_id": f"{label}-{j}", "title": f"{label.capitalize()} clinic: {finding}",
             "text": f"Patients referred with {finding} are assessed in the {label} clinic. "
                     + " ".join(sentence(rng, t) for t in rng.sample(SENTENCES, 3))}
            for label, findings in TASK.items() for j, finding in enumerate(findings)]


def write_beir(folder: Path, corpus: list[dict], queries: list[dict]) -> Path:
    """A BEIR folder: corpus, queries and one qrels file per split (SPLIT_QUERIES, in order)."""
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": q["text"]} for i, q in enumerate(queries)])
    start = 0
    for split, n in SPLIT_QUERIES.items():
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"q{i}\t{queries[i]['doc']}\t1\n" for i in range(start, start + n)))
        start += n
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return domain_corpus(N_DOCS)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    """A smoke workspace on the generated files after one `dvc repro`."""
    tmp = tmp_path_factory.mktemp("e2e_files")
    inputs = tmp / "inputs"
    inputs.mkdir()
    task = referrals(n_per_class=50, seed=1)
    texts = [ex["text"] for ex in task]
    assert len(set(texts)) == len(texts)
    files = {"domain": write_jsonl(inputs / "domain.jsonl", [{"text": t} for t in corpus]),
             "beir": str(write_beir(inputs / "beir", guidelines(seed=2), task)), "task_type": "retrieval"}
    # what dvc.yaml expands into stage names stays in the sections; the budgets go into a profile. DAPT with the
    # adapted vocabulary only (domain_novocab is the classification demo's), TAPT from the general model and
    # after DAPT; the adaptation curve is the demo's test
    templated = {"pretrain": {"variants": ["domain"], "snapshots": [], "tapt": TAPT},
                 "finetune": {"variants": VARIANTS, "seeds": SEEDS}}
    budget = copy.deepcopy({k: v for k, v in SMOKE_PARAMS.items() if k != "ingest"})
    del budget["pretrain"]["snapshots"], budget["finetune"]["seeds"]
    ws = make_workspace(tmp / "ws", deep_update(templated, {
        "ingest": {**SMOKE_PARAMS["ingest"], "source": "files", "files": files},
        "clean": {"preset": "scientific"},
        "profile": "tiny", "profiles": {"tiny": budget}}))
    repro(ws)
    return ws


def test_corpus_has_no_near_duplicates(corpus):
    """The premise: distinct documents, no pair near the near-dedup threshold (word 5-gram Jaccard 0.72)."""
    assert len(set(corpus)) == len(corpus)
    assert all(len(words(doc)) >= 80 for doc in corpus)
    grams = [shingles(doc) for doc in corpus]
    worst = max(len(a & b) / len(a | b) for a, b in itertools.combinations(grams, 2))
    assert worst < 0.2, worst


def test_every_document_survives_clean(finished):
    clean = json.loads((finished / "metrics/clean.json").read_text())
    assert clean["domain"]["input_docs"] == N_DOCS
    assert clean["domain"]["kept"] == N_DOCS, clean["domain"]["dropped"]
    assert not any(clean["domain"]["dropped"].values())
    assert clean["domain_train_docs"] + clean["domain_valid_docs"] == N_DOCS
    assert clean["general"]["kept"] > 0  # the demo's general text, or the file written above


def test_ingest_wrote_the_beir_task(finished):
    test = [json.loads(line) for line in (finished / "data/task/test.jsonl").read_text().splitlines()]
    assert len(test) == SPLIT_QUERIES["test"] and all(set(q) == {"id", "text", "qrels"} for q in test)
    assert len((finished / "data/task/corpus.jsonl").read_text().splitlines()) == 18
    assert json.loads((finished / "metrics/ingest.json").read_text())["task_corpus_docs"] == 18


def test_finetune_results_for_every_variant_and_seed(finished):
    for variant in VARIANTS:
        for seed in SEEDS:
            m = json.loads((finished / "results/finetune" / f"{variant}-{seed}" / "metrics.json").read_text())
            assert m["variant"] == variant and m["seed"] == seed and m["task"] == "retrieval"
            assert 0 <= m["test_ndcg_at_10"] <= 1 and 0 <= m["zero_shot_test_ndcg_at_10"] <= 1
            assert m["test_recall_at_100"] == 1.0  # 18 documents: all of them are in every top 100
            predictions = finished / "results/finetune" / f"{variant}-{seed}" / "predictions.jsonl"
            rows = [json.loads(line) for line in predictions.read_text().splitlines()]
            assert len(rows) == SPLIT_QUERIES["test"] and all(len(r["ranking"]) == 10 for r in rows)


def test_tapt_runs_trained_on_the_task_text_from_their_starts(finished):
    for name in TAPT:
        m = json.loads((finished / "metrics" / f"pretrain_{name}.json").read_text())
        assert m["tokens_seen"] == 20 * 8 * 64 and (finished / "models" / name / "config.json").exists()
        # kept a model TAPT trained (its validation is the task's dev text), not the start it was given
        assert m["best_step"] > 0, m
    assert not (finished / "models" / "tapt_snapshots").exists()
    lock = yaml.safe_load((finished / "dvc.lock").read_text())["stages"]
    assert {d["path"] for d in lock["tapt@dapt_tapt"]["deps"]} >= {"models/domain", "data/task"}
    assert {d["path"] for d in lock["tapt@tapt"]["deps"]} >= {"models/domain_novocab_init", "data/task"}


def test_report_has_a_verdict_and_names_the_profile(finished):
    report = (finished / "reports/comparison.md").read_text()
    verdict, budget = report.split("\n\n")[1:3]
    assert verdict.startswith("**") and "domain - general nDCG@10" in verdict
    assert ("No significant difference" in verdict) or ("significantly" in verdict)
    # the profile's 20 DAPT steps and 1 fine-tuning epoch, not the recipe's, and the report says so
    assert budget.startswith("**Budget (profile tiny): far below the published recipe")
    headline = json.loads((finished / "metrics/headline.json").read_text())
    assert headline["profile"] == "tiny" and headline["far_below_recipe"] is True
    assert {"ndcg_domain", "ndcg_general", "ndcg_diff", "ndcg_bm25", "ndcg_zero_shot_tapt"} <= set(headline)
    assert "| BM25 (bm25s, whole documents, no training) |" in report
    assert "| TAPT after DAPT | dapt_tapt - domain |" in report
    assert json.loads((finished / "metrics/pretrain_domain.json").read_text())["tokens_seen"] == 20 * 8 * 64
    assert json.loads((finished / "metrics/adapt_tokenizer.json").read_text())["new_tokens"] > 0
