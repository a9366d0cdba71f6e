"""End to end on your own files: the whole DAG with `ingest.source: files` on a small curated corpus.

The corpus is generated here: a few hundred distinct clinical-cardiology paragraphs (no exact or near
duplicates: clean's near-dedup step finds nothing to remove, which once crashed it), a three-class referral
task and no general text (ingest then uses the demo's offline general English), cleaned with the `scientific`
preset. The tiny random BERT is the smoke's (`tests/smoke.py`) and so are the budgets, here as a named profile
(`profile: tiny`) over the recipe's sections, as a user runs one; one `dvc repro` serves every test here.
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

from tests.smoke import ROOT, SMOKE_PARAMS, deep_update, make_workspace, repro

pytestmark = pytest.mark.e2e

_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
VARIANTS = _PARAMS["finetune"]["variants"]
SEEDS = SMOKE_PARAMS["finetune"]["seeds"]
N_DOCS = 300

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
    """Labelled referral letters, `n_per_class` of each class, shuffled."""
    rng = random.Random(seed)
    out = []
    for label, findings in TASK.items():
        for _ in range(n_per_class):
            who = rng.choice(WHO)
            text = rng.choice(REFERRALS).format(
                age=rng.randint(19, 91), who=who, who_cap=f"A {who}", finding=rng.choice(findings),
                history=rng.choice(HISTORY), when=rng.choice(WHEN), visit=rng.choice(VISIT),
                when_rel=f"after {rng.choice(WHEN)}")
            out.append({"text": text, "label": label})
    rng.shuffle(out)
    return out


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
             "train": write_jsonl(inputs / "train.jsonl", task[:90]),
             "dev": write_jsonl(inputs / "dev.jsonl", task[90:114]),
             "test": write_jsonl(inputs / "test.jsonl", task[114:])}
    # what dvc.yaml expands into stage names stays in the sections; the budgets go into a profile
    templated = {"pretrain": {"snapshots": SMOKE_PARAMS["pretrain"]["snapshots"]},
                 "finetune": {"seeds": SEEDS}}
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


def test_finetune_results_for_every_variant_and_seed(finished):
    for variant in VARIANTS:
        for seed in SEEDS:
            m = json.loads((finished / "results/finetune" / f"{variant}-{seed}" / "metrics.json").read_text())
            assert m["variant"] == variant and m["seed"] == seed
            assert m["labels"] == sorted(TASK) and 0 <= m["test_macro_f1"] <= 1
            rows = (finished / "results/finetune" / f"{variant}-{seed}" / "predictions.jsonl").read_text().splitlines()
            assert len(rows) == 150 - 114


def test_report_has_a_verdict_and_names_the_profile(finished):
    report = (finished / "reports/comparison.md").read_text()
    verdict, budget = report.split("\n\n")[1:3]
    assert verdict.startswith("**") and "domain - general macro-F1" in verdict
    assert ("No significant difference" in verdict) or ("significantly" in verdict)
    # the profile's 20 DAPT steps and 1 fine-tuning epoch, not the recipe's, and the report says so
    assert budget.startswith("**Budget (profile tiny): far below the published recipe")
    headline = json.loads((finished / "metrics/headline.json").read_text())
    assert headline["profile"] == "tiny" and headline["far_below_recipe"] is True
    assert json.loads((finished / "metrics/pretrain_domain.json").read_text())["tokens_seen"] == 20 * 8 * 64
    assert json.loads((finished / "metrics/adapt_tokenizer.json").read_text())["new_tokens"] > 0
