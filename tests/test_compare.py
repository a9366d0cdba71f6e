"""compare: statistics, the verdict wording, and the stage on fake fine-tuning results."""

import json

import numpy as np
import pytest

from stages.compare import (
    class_counts,
    entity_counts,
    macro_f1_resampled,
    paired_bootstrap,
    paired_difference,
    summarise,
    verdict,
)


def runs_of(general, domain):
    return {"general": {s: {"test_macro_f1": f, "test_accuracy": f} for s, f in enumerate(general)},
            "domain": {s: {"test_macro_f1": f, "test_accuracy": f} for s, f in enumerate(domain)}}


def test_paired_difference_and_summary():
    runs = runs_of([0.5, 0.6, 0.7], [0.6, 0.7, 0.7])
    diff = paired_difference(runs, "domain", "general", "test_macro_f1")
    assert diff["mean"] == pytest.approx(0.2 / 3) and diff["wins"] == 2 and diff["n"] == 3
    assert summarise(runs)["general"]["test_macro_f1"]["mean"] == pytest.approx(0.6)
    assert summarise(runs)["general"]["test_macro_f1"]["std"] == pytest.approx(0.1)


def test_paired_t_test_matches_hand_computation():
    diff = paired_difference(runs_of([0.50, 0.60, 0.70], [0.55, 0.62, 0.78]), "domain", "general", "test_macro_f1")
    d = [0.05, 0.02, 0.08]
    mean, sd = sum(d) / 3, (sum((x - sum(d) / 3) ** 2 for x in d) / 2) ** 0.5
    assert diff["mean"] == pytest.approx(mean) and diff["std"] == pytest.approx(sd)
    half = 4.302652729911275 * sd / 3 ** 0.5  # t(0.975, df=2)
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert diff["p_value"] == pytest.approx(0.1020, abs=5e-4)  # t = 0.05 / (0.03 / sqrt(3)) = 2.89, df = 2


def test_verdict_is_honest_about_noise():
    consistent = paired_difference(runs_of([0.5, 0.6, 0.7, 0.6], [0.61, 0.70, 0.82, 0.69]), "domain", "general",
                                   "test_macro_f1")
    assert verdict(consistent).startswith("The domain-adapted model is significantly better")
    worse = paired_difference(runs_of([0.5, 0.6, 0.7, 0.6], [0.39, 0.50, 0.58, 0.51]), "domain", "general",
                              "test_macro_f1")
    assert verdict(worse).startswith("The domain-adapted model is significantly worse")
    noisy = paired_difference(runs_of([0.5, 0.6, 0.7], [0.6, 0.5, 0.71]), "domain", "general", "test_macro_f1")
    assert verdict(noisy).startswith("No significant difference")


def test_resampled_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 300), rng.integers(0, 3, 300)  # class 3 is never predicted
    counts = class_counts([str(c) for c in y], [str(c) for c in p], [str(c) for c in range(5)])
    ours = macro_f1_resampled(counts, np.ones((1, 300)))[0]  # class 4 appears nowhere: not counted
    assert ours == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    weights = rng.multinomial(300, np.full(300, 1 / 300), size=3).astype(float)
    for w, f1 in zip(weights, macro_f1_resampled(counts, weights), strict=True):
        idx = np.repeat(np.arange(300), w.astype(int))
        assert f1 == pytest.approx(f1_score(y[idx], p[idx], average="macro", zero_division=0))


def test_entity_counts_give_seqeval_macro_f1():
    from seqeval.metrics import f1_score

    gold = [["B-ORG", "I-ORG", "O", "B-LAW"], ["O", "B-PER", "O"], ["B-LAW", "I-LAW", "I-LAW"]]
    pred = [["B-ORG", "O", "O", "B-LAW"], ["O", "B-PER", "B-ORG"], ["B-LAW", "I-LAW", "I-LAW"]]
    counts = entity_counts(gold, pred, ["LAW", "ORG", "PER"])
    assert counts[0].sum() == 3 and counts[1].sum() == 4 and counts[2].sum() == 5  # matched, gold, predicted
    assert macro_f1_resampled(counts, np.ones((1, 3)))[0] == pytest.approx(f1_score(gold, pred, average="macro"))
    twice = np.array([[2.0, 0.0, 1.0]])  # sentence 1 twice, sentence 2 dropped
    idx = [0, 0, 2]
    assert macro_f1_resampled(counts, twice)[0] == pytest.approx(
        f1_score([gold[i] for i in idx], [pred[i] for i in idx], average="macro"))


def test_paired_bootstrap_separates_signal_from_noise():
    labels = ["a", "b"] * 100

    def paired_bootstrap_of(y, preds_a, preds_b, resamples, seed):
        return paired_bootstrap([class_counts(y, pa, ["a", "b"]) for pa in preds_a],
                                [class_counts(y, pb, ["a", "b"]) for pb in preds_b], resamples, seed)
    same = paired_bootstrap_of(labels, [labels[::-1]], [labels[::-1]], 500, 0)
    assert same["mean"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["p_value"] == 1
    flipped = ["b" if x == "a" else "a" for x in labels]
    clear = paired_bootstrap_of(labels, [labels, labels], [flipped, flipped], 500, 0)
    assert clear["mean"] == 1 and clear["ci_low"] > 0.9 and clear["p_value"] == 0
    noisy = [x if i % 10 else ("b" if x == "a" else "a") for i, x in enumerate(labels)]  # 10% wrong
    other = list(noisy)  # two errors fixed, two new ones: as good, differently wrong
    other[0], other[10], other[1], other[2] = labels[0], labels[10], noisy[2], noisy[1]
    close = paired_bootstrap_of(labels, [noisy], [other], 500, 0)
    assert close["ci_low"] < 0 < close["ci_high"] and close["p_value"] > 0.05


# ---------------------------------------------------------------------------------------------------
# the stage, on fabricated fine-tuning, pretraining and tokenizer results

import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402

import mlflow  # noqa: E402

from dapt.finetuning.tasks import scores  # noqa: E402
from stages.compare import CompareParams, run  # noqa: E402
from stages.finetune import FinetuneParams, TrainingParams, run_name  # noqa: E402
from tests.conftest import wordpiece_tokenizer, write_jsonl  # noqa: E402

SEEDS = [0, 1, 2]
FP = FinetuneParams(variants=["general", "domain", "domain_novocab"], seeds=SEEDS, training=TrainingParams(
    learning_rate=1e-4, epochs=1, batch_size=2, max_seq_length=16, warmup_ratio=0, weight_decay=0))
CLASSES = ["copyleft", "permissive", "proprietary"]
# share of test texts each model gets right: domain clearly better; the curve rises from 0% to 50% to 100%
ACCURACY = {"general": 0.6, "domain": 0.9, "domain_novocab": 0.8, "domain-at0": 0.55, "domain-at50": 0.75}


def fake_predictions(key: str, seed: int, gold: list[str]) -> list[str]:
    rng = random.Random(f"{key}-{seed}")
    return [y if rng.random() < ACCURACY[key] else CLASSES[(CLASSES.index(y) + 1) % 3] for y in gold]


def write_run(project, name: str, metrics: dict, rows: list[dict]) -> None:
    out = project.finetune / name
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(metrics))
    write_jsonl(out / "predictions.jsonl", rows)


def fabricate(project) -> None:
    """Everything compare reads: task, base tokenizer, 3 variants x 3 seeds, a curve at 0% and 50%, pretrain and
    tokenizer metrics. Every fifth text is longer than FP's 16 tokens (the label word comes first)."""
    gold = [CLASSES[i % 3] for i in range(150)]
    for split in ("train", "dev", "test"):
        write_jsonl(project.task / f"{split}.jsonl", [{"text": f"{y} licence {i}" + " text" * 8 * (i % 5 == 0),
                                                       "label": y} for i, y in enumerate(gold)])
    wordpiece_tokenizer().save_pretrained(project.base_model)
    for key in ACCURACY:
        variant, at = (key.split("-at")[0], int(key.split("-at")[1])) if "-at" in key else (key, None)
        for seed in SEEDS:
            pred = fake_predictions(key, seed, gold)
            m = {f"test_{k}": v for k, v in scores([CLASSES.index(y) for y in gold],
                                                    [CLASSES.index(y) for y in pred]).items()}
            m.update(variant=variant, seed=seed, labels=CLASSES, dev_macro_f1=0.5, mlflow_run_id=None)
            if at is not None:
                m.update(dapt_percent=at, snapshot={"percent": at, "reached": True, "step": at * 2,
                                                    "tokens_seen": at * 2 * 2048, "corpus_epochs": at / 80,
                                                    "device": "cpu"})
            write_run(project, run_name(variant, seed, at), m,
                      [{"id": i, "label": y, "pred": p} for i, (y, p) in enumerate(zip(gold, pred))])
    project.metrics.mkdir()
    for v, general_end in (("domain", 5.5), ("domain_novocab", 5.4)):
        (project.metrics / f"pretrain_{v}.json").write_text(json.dumps({
            "stop_reason": "max_steps", "steps": 200, "best_step": 200, "tokens_seen": 409600, "corpus_epochs": 1.25,
            "seconds": 360.0,
            "device_hours": 0.1, "snapshot_device_hours": {str(at): at / 1000 for at in (0, 50)},
            "device": "cpu", "domain_loss_start": 6.0, "domain_loss_best": 4.0,
            "domain_loss_end": 4.0, "general_loss_start": 5.0 + (v == "domain") * 0.1, "general_loss_best": general_end,
            "general_loss_end": general_end}))
        (project.metrics / f"pretrain_{v}_curve.csv").write_text(
            "step,domain_loss,general_loss\n30,6.0,5.0\n130,5.0,5.2\n230,4.0,5.5\n")
    (project.metrics / "adapt_tokenizer.json").write_text(json.dumps({
        "new_tokens": 2, "base_vocab_size": 100, "vocab_size": 102, **{f"{t}_{k}_{w}": 1.2 - 0.1 * (w == "after")
                                                                      for t in ("domain", "general")
                                                                      for k in ("tokens_per_word", "split_3plus")
                                                                      for w in ("before", "after")}}))
    project.reports.mkdir()
    (project.reports / "new_tokens.tsv").write_text("token\tfrequency\tbase_pieces\ttokens_saved\n"
                                                    "licensor\t1270\t3\t2540\n")


def test_stage_writes_the_report_figures_metrics_and_mlflow_children(project):
    fabricate(project)
    run(CompareParams(tfidf_max_features=1000, tfidf_c=1.0, bootstrap_resamples=500), FP, project, [0, 50])
    report = (project.reports / "comparison.md").read_text()
    lines = report.splitlines()
    assert lines[2].startswith("**The domain-adapted model is significantly better: domain - general macro-F1 = +0.")
    assert "paired bootstrap over 150 test texts x 3 seeds" in lines[2]
    assert "Pretraining hit its budget (200 steps, 409,600 tokens, 1.25 corpus epochs)" in report
    assert "| domain | 200 | max_steps | 200 | 409,600 | 1.25 | 360 | domain |" in report
    general = [json.loads((project.finetune / f"general-{s}" / "metrics.json").read_text())["test_macro_f1"]
               for s in SEEDS]
    assert f"| general | 3 | {sum(general) / 3:.3f} +- " in report
    # the references: one on the text the transformers saw (the first 16 tokens), one on whole texts
    assert "| TF-IDF + LR, same text as the transformers (first 16 tokens) | - |" in report
    assert "| TF-IDF + LR, whole text | - |" in report
    assert "nothing after: 20% of test texts were longer (counted with the general model's tokenizer)" in report
    # the budget, right after the verdict: 409,600 tokens of a 327,680-token corpus (1.25 epochs) is an eighth of
    # the recipe's 10 epochs, but 1 fine-tuning epoch and 20% of test texts cut are far below it
    assert lines[4].startswith("**Budget: far below the published recipe.** DAPT saw 0.41M tokens (1.25 corpus "
                               "epochs; the recipe trains 3.28M here: 10 epochs); fine-tuning 1 epochs at 16 tokens")
    assert lines[4].endswith("20% of test texts truncated). Read the verdict as a smoke test of the pipeline, not as "
                             "evidence about DAPT.")
    # forgetting probe: the general model is the base-vocabulary run's start
    assert "| general model (base encoder and vocabulary) | 5.000 | 148.4 | - |" in report
    assert "| domain after DAPT (step 200) | 5.500 | 244.7 | +0.500 (+10.0%) |" in report
    assert "General loss *fell*" not in report  # it rose in both runs
    # adaptation curve: two snapshots and the final model, with their compute; the last stretch still pays
    assert "| 0% | 0 | 0 | 0 | 0 (cpu) |" in report and "| 50% | 100 | 204,800 | 0.625 | 0.05 (cpu) |" in report
    assert "| final (step 200, max_steps) | 200 | 409,600 | 1.25 | 0.1 (cpu) |" in report
    assert "From step 100 to step 200 of DAPT, macro-F1 changed by +0." in report
    assert "still rising at the end" in report
    assert "`licensor` (1,270x, 3 pieces before)" in report
    for name in ("scores", "confusion", "adaptation_curve", "dapt_loss", "fertility"):
        assert (project.reports / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"(figures/{name}.png)" in report
    metrics = json.loads((project.metrics / "compare.json").read_text())
    assert metrics["domain_minus_general_ci_low"] > 0 and metrics["domain_minus_general_p_value"] < 0.05
    assert metrics["general_truncated_test"] == metrics["budget_truncated_test"] == pytest.approx(0.2)
    assert metrics["budget_recipe_tokens"] == 3_276_800 and metrics["budget_far_below"] is True
    assert "budget_profile" not in metrics  # none given
    # the headline `dvc metrics show` prints: the verdict's numbers, a dozen of them
    head = json.loads((project.metrics / "headline.json").read_text())
    assert head["verdict"] == "better" and head["f1_diff"] == metrics["domain_minus_general_macro_f1_mean"]
    assert head["f1_domain"] == metrics["domain_macro_f1_mean"] and head["p_value"] < 0.05
    assert head["f1_tfidf_same_text"] == metrics["tfidf_same_text_macro_f1"]
    assert head["f1_tfidf_whole_text"] == metrics["tfidf_whole_text_macro_f1"]
    assert head["dapt_tokens"] == 409_600 and head["far_below_recipe"] is True
    assert head["truncated_test"] == pytest.approx(0.2)
    assert head["general_loss_ratio"] == pytest.approx(5.5 / 5.0)  # domain after DAPT / the general model
    assert len(head) <= 15
    assert metrics["general_text_loss_domain"] == 5.5 and metrics["curve_50_macro_f1_mean"] < \
        metrics["domain_macro_f1_mean"]
    curve = (project.metrics / "adaptation_curve.csv").read_text().splitlines()
    assert curve[0] == "percent,step,tokens_seen,device_hours,macro_f1_std,minus_general,macro_f1_mean"
    assert len(curve) == 4
    # MLflow: the comparison is the parent of every fine-tuning run it compares
    parent = mlflow.search_runs(experiment_names=["dapt"], filter_string="tags.stage = 'compare'",
                                output_format="list")[0]
    children = mlflow.search_runs(experiment_names=["dapt"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3 * 3 + 2 * 3
    tagged = {(c.data.tags["variant"], c.data.tags["seed"], c.data.tags.get("dapt_percent")) for c in children}
    assert ("domain", "2", None) in tagged and ("domain", "0", "50") in tagged and ("general", "1", None) in tagged
    child = next(c for c in children if c.info.run_name == "finetune-general-0")
    assert child.data.metrics["test_macro_f1"] == pytest.approx(general[0])
    assert child.data.params["learning_rate"] == "0.0001"


def test_html_report_renders_offline_in_headless_chromium(project, tmp_path):
    """The HTML opens in a real browser with no network: the verdict, the table and every figure show."""
    import os

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium: `make install` installs Debian's chromium package")
        pytest.skip("no Chromium on this machine")
    from playwright.sync_api import sync_playwright

    fabricate(project)
    run(CompareParams(tfidf_max_features=1000, tfidf_c=1.0, bootstrap_resamples=200), FP, project, [0, 50])
    html = (project.reports / "comparison.html").resolve()
    moved = tmp_path / "elsewhere" / "report.html"  # self-contained: it must not need the figures folder
    moved.parent.mkdir()
    shutil.copy(html, moved)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(moved.as_uri(), wait_until="load")
        assert page.locator("strong").first.inner_text().startswith("The domain-adapted model is significantly better")
        first_table = page.locator("table").first
        assert first_table.is_visible() and "domain_novocab" in first_table.inner_text()
        assert page.locator("table").count() >= 5  # scores, forgetting, curve, pretraining, tokenizer
        images = page.locator("img")
        assert images.count() == 5
        for i in range(images.count()):
            img = images.nth(i)
            img.scroll_into_view_if_needed()
            assert img.is_visible() and img.evaluate("e => e.complete && e.naturalWidth > 100"), i
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert requests == [moved.as_uri()]  # nothing fetched but the page itself
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_stage_on_a_token_classification_task(project):
    gold = [["B-LAW", "I-LAW", "O", "B-ORG"], ["O", "B-ORG", "O"], ["B-LAW", "O", "O"]] * 20
    for split in ("train", "dev", "test"):
        write_jsonl(project.task / f"{split}.jsonl", [{"tokens": ["x"] * len(t), "tags": t, "text": "x"} for t in gold])
    wordpiece_tokenizer().save_pretrained(project.base_model)
    from seqeval.metrics import f1_score

    fp = FP.model_copy(update={"variants": ["general", "domain"], "seeds": [0, 1]})
    for variant, miss in (("general", 3), ("domain", 7)):  # every `miss`-th sentence loses its last entity
        for seed in fp.seeds:
            pred = [t[:-1] + ["O"] if (i + seed) % miss == 0 else t for i, t in enumerate(gold)]
            m = {"task": "token_classification", "variant": variant, "seed": seed,
                 "test_macro_f1": f1_score(gold, pred, average="macro"), "test_accuracy": 0.9}
            write_run(project, f"{variant}-{seed}", m, [{"id": i, "tags": g, "pred": p}
                                                        for i, (g, p) in enumerate(zip(gold, pred))])
    run(CompareParams(tfidf_max_features=1000, tfidf_c=1.0, bootstrap_resamples=300), fp, project, [])
    report = (project.reports / "comparison.md").read_text()
    assert "| variant | seeds | test entity macro-F1 | test token accuracy |" in report
    assert "No TF-IDF reference" in report and "test sentences" in report
    assert ("first 16 tokens of each sentence (special tokens included) and nothing after: "
            "0% of test sentences") in report
    assert "TF-IDF row" not in report
    metrics = json.loads((project.metrics / "compare.json").read_text())
    expected = sum(json.loads((project.finetune / f"{v}-{s}" / "metrics.json").read_text())["test_macro_f1"]
                   * (1 if v == "domain" else -1) for v in ("domain", "general") for s in fp.seeds) / 2
    assert metrics["domain_minus_general_macro_f1_mean"] == pytest.approx(expected)
    assert "tfidf_macro_f1" not in metrics and not math.isnan(metrics["domain_minus_general_ci_low"])
    assert (project.reports / "figures" / "confusion.png").exists()


def test_curve_leaves_out_snapshots_training_never_reached(project):
    from stages.compare import curve_points, load_runs

    fabricate(project)
    for seed in SEEDS:  # stopped early at step 80: the 50% snapshot (step 100) is the final model again
        path = project.finetune / f"domain-at50-{seed}" / "metrics.json"
        m = json.loads(path.read_text())
        m["snapshot"].update(reached=False, step=80)
        path.write_text(json.dumps(m))
    pre = {"stop_reason": "patience", "steps": 120, "best_step": 80, "tokens_seen": 120 * 2048, "seconds": 60.0}
    runs = load_runs(project, FP.variants, SEEDS)
    points = curve_points(project, FP, [0, 50], runs, pre)
    assert [(p["label"], p["step"], p["tokens_seen"]) for p in points] == [
        ("0%", 0, 0), ("final (step 80, patience)", 80, 80 * 2048)]
    assert points[1]["device_hours"] == pytest.approx(60 / 3600)
    assert points[0]["device_hours"] == 0  # no record (a resumed run): the run's share by steps


def test_stage_with_a_subset_of_variants_and_truncation_recorded_by_the_runs(project):
    """finetune.variants without domain_novocab: the forgetting table compares with the domain model before DAPT
    (no general-model row to compare with), and says so; truncation comes from the runs, per variant."""
    fabricate(project)
    fp = FP.model_copy(update={"variants": ["general", "domain"]})
    for variant, share in (("general", 0.5), ("domain", 0.25)):
        for seed in SEEDS:
            path = project.finetune / run_name(variant, seed) / "metrics.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "epochs_run": 1.0,
                                        "truncated": {"train": share, "dev": share, "test": share}}))
    run(CompareParams(tfidf_max_features=1000, tfidf_c=1.0, bootstrap_resamples=200), fp, project, [], "cpu-demo")
    report = (project.reports / "comparison.md").read_text()
    assert report.splitlines()[4].startswith("**Budget (profile cpu-demo): far below the published recipe.**")
    assert "50% of test texts were longer (general 50%, domain 25%: each variant's own tokenizer)" in report
    assert "| model | general MLM loss | perplexity | vs domain before DAPT |" in report
    assert "| domain before DAPT (new vocabulary, step 0) | 5.100 |" in report
    assert "| domain after DAPT (step 200) | 5.500 | 244.7 | +0.400 (+7.8%) |" in report
    assert "general model (base" not in report and "The general model is" not in report
    assert "No general-model row" in report and "domain_novocab after" not in report
    head = json.loads((project.metrics / "headline.json").read_text())
    assert head["profile"] == "cpu-demo" and head["truncated_test"] == 0.5
    assert head["general_loss_ratio"] == pytest.approx(5.5 / 5.1)
    metrics = json.loads((project.metrics / "compare.json").read_text())
    assert metrics["domain_truncated_test"] == 0.25 and metrics["budget_finetune_epochs_run"] == 1.0


# ---------------------------------------------------------------------------------------------------
# what the transformers saw, the budget, the forgetting table, the metrics DVC shows


def test_seen_texts_cut_where_the_last_token_that_fits_ends():
    from stages.compare import seen_texts, truncated_share
    from tests.conftest import bpe_tokenizer

    text = "The cat sat on the mat and the dog slept by the fire while it rained outside."
    # 8 positions: [CLS] + 6 tokens + [SEP]; WordPiece knows these words whole, byte-level BPE splits them
    assert seen_texts(wordpiece_tokenizer(), [text, "The cat sat."], 8) == ["The cat sat on the mat", "The cat sat."]
    assert seen_texts(bpe_tokenizer(), [text], 8) == ["The cat sat on"]  # The, Ġc, at, Ġs, at, Ġon
    # a word cut inside: the text ends where its last piece that fits ends
    assert wordpiece_tokenizer().tokenize("copyleft")[:4] == ["copy", "##l", "##e", "##f"]
    assert seen_texts(wordpiece_tokenizer(), ["copyleft licence text"], 6) == ["copylef"]
    assert truncated_share(wordpiece_tokenizer(), [{"text": text}, {"text": "The cat sat."}], 8) == 0.5
    words = [{"tokens": text.split()}, {"tokens": ["The", "cat"]}, {"tokens": ["the"] * 6}]  # 6 + 2 specials fit
    assert truncated_share(wordpiece_tokenizer(), words, 8) == pytest.approx(1 / 3)


def test_budget_far_below_the_recipe_and_not():
    from dapt.report import budget_line
    from stages.compare import RECIPE, budget

    demo = TrainingParams(learning_rate=1e-4, epochs=2, batch_size=16, max_seq_length=64, warmup_ratio=0.1,
                          weight_decay=0.01)
    b = budget({"tokens_seen": 307_200, "corpus_epochs": 0.3}, demo, 0.87, "cpu-demo")
    assert b["recipe_tokens"] == 10_240_000 and b["recipe_bound"] == "epochs"  # 10 epochs of a 1.024M corpus
    assert b["reasons"] == ["dapt", "epochs", "truncated"] and b["far_below"]
    assert budget_line(b) == (
        "**Budget (profile cpu-demo): far below the published recipe.** DAPT saw 0.307M tokens (0.3 corpus epochs; "
        "the recipe trains 10.2M here: 10 epochs); fine-tuning 2 epochs at 64 tokens, learning rate 0.0001 (recipe: "
        "up to 10 epochs, best on dev, patience 3, 512 tokens, learning rate 2e-05 to 5e-05; 87% of test texts "
        "truncated). Read the verdict as a smoke test of the pipeline, not as evidence about DAPT.")
    # each reason alone is enough
    assert budget({"tokens_seen": 900_000, "corpus_epochs": 0.9}, demo.model_copy(update={"epochs": 3}), 0.0,
                  None)["reasons"] == ["dapt"]  # a tenth of the recipe's 10 epochs is the line: 0.9 is under
    assert budget({"tokens_seen": 1_000_000, "corpus_epochs": 1.0}, demo.model_copy(update={"epochs": 3}), 0.0,
                  None)["reasons"] == []
    recipe = TrainingParams(learning_rate=2e-5, epochs=10, patience=3, batch_size=16, max_seq_length=512,
                            warmup_ratio=0.06, weight_decay=0.01)
    assert budget(None, recipe, 0.11, None)["reasons"] == ["truncated"]
    assert budget(None, recipe.model_copy(update={"epochs": 2}), 0.0, None)["reasons"] == ["epochs"]
    # a large corpus: the recipe stops at 2B tokens; 1.5B of them is not far below
    big = budget({"tokens_seen": 1_500_000_000, "corpus_epochs": 0.3}, recipe, 0.05, None, epochs_run=4.5)
    assert big["recipe_tokens"] == RECIPE.dapt_max_tokens and big["recipe_bound"] == "tokens"
    assert not big["far_below"] and big["dapt_share_of_recipe"] == pytest.approx(0.75)
    assert budget_line(big) == (
        "Budget: not far below the published recipe. DAPT saw 1.5B tokens (0.3 corpus epochs; the recipe trains 2B "
        "here: 2B tokens); fine-tuning up to 10 epochs (best on dev, patience 3; 4.5 run on average) at 512 tokens "
        "(recipe: up to 10 epochs, best on dev, patience 3, 512 tokens, learning rate 2e-05 to 5e-05; 5% of test "
        "texts truncated).")


def test_forgetting_table_header_and_notes_follow_the_variants_that_ran():
    from dapt.report import forgetting_section
    from stages.compare import forgetting_probe

    def pre(start, best):
        return {"general_loss_start": start, "general_loss_best": best, "best_step": 10}

    both = forgetting_section(forgetting_probe({"pretrain_domain": pre(5.1, 5.5),
                                                "pretrain_domain_novocab": pre(5.0, 5.4)}), 0.01)
    assert "| model | general MLM loss | perplexity | vs the general model |" in both
    assert "| general model (base encoder and vocabulary) | 5.000 | 148.4 | - |" in both[6]
    assert any("The general model is the base encoder" in line for line in both)
    only_domain = "\n".join(forgetting_section(forgetting_probe({"pretrain_domain": pre(5.1, 5.5)}), 0.01))
    assert "vs domain before DAPT |" in only_domain and "| domain before DAPT (new vocabulary, step 0) | 5.100 |" \
        in only_domain and "general model (base" not in only_domain and "The general model is" not in only_domain
    assert "No general-model row" in only_domain and "adapted tokenizer" in only_domain
    only_novocab = "\n".join(forgetting_section(forgetting_probe({"pretrain_domain_novocab": pre(5.0, 5.4)}), 0.01))
    assert "vs the general model |" in only_novocab and "domain before DAPT" not in only_novocab
    assert "| domain_novocab after DAPT (step 10) | 5.400 |" in only_novocab
    assert "adapted tokenizer" not in only_novocab  # no row under it
    assert forgetting_probe({"adapt_tokenizer": {}}) == []


def test_dvc_metrics_show_prints_the_headline_only():
    """Every other metrics file is a plain output (cache: false): `dvc metrics show` prints one short row, and
    `dvc metrics show metrics/compare.json` the detail."""
    from pathlib import Path

    import yaml

    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    declared = [next(iter(m)) if isinstance(m, dict) else m for s in stages.values() for m in s.get("metrics", [])]
    assert declared == ["${paths.metrics}/headline.json"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])]
    for name in ("ingest", "clean", "adapt_tokenizer", "pretrain_${item.variant}", "compare"):
        assert f"${{paths.metrics}}/{name}.json" in outs, name


def test_params_sections_hold_the_published_recipe():
    """What a user's own data gets (no profile) is what the report measures budgets against."""
    from pathlib import Path

    from dapt.common import read_params_file
    from stages.compare import RECIPE

    data = read_params_file(Path(__file__).resolve().parents[1] / "params.yaml", profile=False)
    pre, ft = data["pretrain"], data["finetune"]["training"]
    assert (pre["max_steps"], pre["max_tokens"], pre["max_epochs"]) == (None, RECIPE.dapt_max_tokens,
                                                                          RECIPE.dapt_max_epochs)
    assert RECIPE.learning_rate[0] <= ft["learning_rate"] <= RECIPE.learning_rate[1]
    assert (ft["epochs"], ft["patience"], ft["max_seq_length"]) == (RECIPE.epochs, RECIPE.patience,
                                                                    RECIPE.max_seq_length)


def test_stage_on_a_retrieval_task_with_tapt_variants(project):
    """Fabricated retrieval runs: per-query nDCG@10 decides the verdict, BM25 and the zero-shot models are the
    references, and the TAPT variants get their own paired rows."""
    corpus = [{"id": f"d{i}", "title": f"licence {i}", "text": f"the {w} licence grants rights" * 2}
              for i, w in enumerate(["apache", "gnu", "mit", "mozilla", "eclipse", "boost"])]
    queries = [{"id": f"q{i}", "text": f"{w} notice", "qrels": {f"d{i % 6}": 1}}
               for i, w in enumerate(["apache", "gnu", "mit", "mozilla", "eclipse", "boost"] * 10)]
    for split in ("train", "dev", "test"):
        write_jsonl(project.task / f"{split}.jsonl", queries)
    write_jsonl(project.task / "corpus.jsonl", corpus)
    wordpiece_tokenizer().save_pretrained(project.base_model)
    fp = FP.model_copy(update={"variants": ["general", "domain", "tapt", "dapt_tapt"], "seeds": [0, 1]})
    hit = {"general": 0.5, "domain": 0.9, "tapt": 0.6, "dapt_tapt": 0.95}  # share of queries ranked right at 1
    per_query = {}
    for v, share in hit.items():
        for seed in fp.seeds:
            rng = random.Random(f"{v}-{seed}")
            ndcg = [1.0 if rng.random() < share else 0.0 for _ in queries]
            per_query[v, seed] = ndcg
            m = {"task": "retrieval", "variant": v, "seed": seed, "test_ndcg_at_10": float(np.mean(ndcg)),
                 "test_mrr_at_10": float(np.mean(ndcg)), "test_recall_at_100": 1.0,
                 **{f"zero_shot_test_{k}": 0.1 for k in ("ndcg_at_10", "mrr_at_10", "recall_at_100")},
                 "truncated": {"train": 0.0, "dev": 0.0, "test": 0.0, "corpus": 0.5}}
            write_run(project, f"{v}-{seed}", m, [{"id": q["id"], "qrels": q["qrels"], "ranking": [],
                                                   "ndcg_at_10": n, "mrr_at_10": n, "recall_at_100": 1.0}
                                                  for q, n in zip(queries, ndcg)])
    run(CompareParams(tfidf_max_features=1000, tfidf_c=1.0, bootstrap_resamples=300), fp, project, [])
    report = (project.reports / "comparison.md").read_text()
    assert "domain - general nDCG@10 = " in report.splitlines()[2]
    assert "| variant | seeds | test nDCG@10 | test MRR@10 | test Recall@100 |" in report
    assert "| BM25 (bm25s, whole documents, no training) | - | 1.000 |" in report  # each query names its document
    assert "| general, zero-shot (not fine-tuned) | - | 0.100 | 0.100 | 0.100 |" in report
    assert "paired bootstrap over 60 test queries x 2 seeds" in report
    assert "and 50% of the corpus's documents were longer" in report
    assert "50% of corpus documents truncated" in report.split("\n\n")[2]  # the budget: what the cut costs
    assert "| tapt | 2 |" in report and "zero-shot" in report
    assert "## What the domain corpus and the task text each add" in report
    for row in ("| TAPT (task text) | tapt - general |", "| TAPT after DAPT | dapt_tapt - domain |",
                "| DAPT before TAPT | dapt_tapt - tapt |", "| DAPT + TAPT | dapt_tapt - general |"):
        assert row in report
    assert "Errors" not in report and not (project.reports / "figures" / "confusion.png").exists()
    metrics = json.loads((project.metrics / "compare.json").read_text())
    gain = np.mean([np.mean(per_query["domain", s]) - np.mean(per_query["general", s]) for s in fp.seeds])
    assert metrics["domain_minus_general_ndcg_at_10_mean"] == pytest.approx(gain)
    assert metrics["tapt_minus_general_ndcg_at_10_mean"] == pytest.approx(
        np.mean([np.mean(per_query["tapt", s]) - np.mean(per_query["general", s]) for s in fp.seeds]))
    assert metrics["bm25_ndcg_at_10"] == 1.0 and metrics["zero_shot_domain_ndcg_at_10"] == 0.1
    head = json.loads((project.metrics / "headline.json").read_text())
    assert head["verdict"] == "better" and head["ndcg_diff"] == pytest.approx(gain) and head["ndcg_bm25"] == 1.0
    assert "f1_diff" not in head
    assert head["truncated_corpus"] == 0.5 and "truncated_test" not in head  # the share the budget line names


def test_bootstrap_refuses_runs_that_scored_different_queries():
    from stages.compare import bootstrap_runs

    rows = {"a-0": [{"id": "q1", "ndcg_at_10": 1.0}, {"id": "q2", "ndcg_at_10": 0.0}],
            "b-0": [{"id": "q2", "ndcg_at_10": 0.0}, {"id": "q1", "ndcg_at_10": 1.0}]}  # another order
    p = CompareParams(tfidf_max_features=1000, tfidf_c=1.0, bootstrap_resamples=100)
    with pytest.raises(ValueError, match="scored different test examples"):
        bootstrap_runs(rows, ["a-0"], ["b-0"], "retrieval", [], p)
    rows["b-0"] = rows["b-0"][::-1]
    assert bootstrap_runs(rows, ["a-0"], ["b-0"], "retrieval", [], p)["mean"] == 0
