"""``lclsc report WORKDIR``: a tiny trained run and a tiny 2-fold CV study, through the command line.

The numbers in the HTML are checked against an independent recomputation from the run's
predictions (``runs.predict`` on its test split, or the CV folds' saved held-out predictions):
scikit-learn for accuracy / balanced accuracy / F1 / AUROC, a NumPy group-by for per-patient
accuracy. The page must be self-contained (only ``data:`` images, ``#`` links, no script).
"""

from __future__ import annotations

import html.parser
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sklearn.metrics as skm

from lclsc_jax.protocols import runs
from lclsc_jax.train import loop

SECTIONS = ("overview", "metrics", "roc", "calibration", "patients", "confidence", "gallery", "sanity", "robustness",
            "sequences")


def _lclsc(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (as a user would)."""
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *args], capture_output=True, text=True,
                          timeout=900)


class _Page(html.parser.HTMLParser):
    """Every element's tag and attributes, and the text and attributes of table cells by row."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.rows: list[tuple[dict[str, str], list[dict[str, str]]]] = []
        self._cell: dict[str, str] | None = None
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag == "script":
            self.scripts += 1
        if tag == "tr":
            self.rows.append((a, []))
        if tag in ("td", "th") and self.rows:
            self._cell = dict(a, _text="")
            self.rows[-1][1].append(self._cell)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["_text"] += data


def _parse(path: str) -> tuple[str, _Page]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    page = _Page()
    page.feed(text)
    return text, page


def _metric(page: _Page, key: str, attr: str = "data-metric") -> float:
    """The full-precision ``data-value`` of the cell tagged ``attr=key``."""
    for _, cells in page.rows:
        for c in cells:
            if c.get(attr) == key:
                return float(c["data-value"])
    raise AssertionError(f"no cell with {attr}={key}")


def _patients(page: _Page) -> dict[str, float]:
    """``{patient: accuracy}`` from the per-patient table's rows."""
    out = {}
    for attrs, cells in page.rows:
        if "data-patient" in attrs:
            vals = [c for c in cells if "data-value" in c]
            out[attrs["data-patient"]] = float(vals[0]["data-value"])
    return out


def _check_self_contained(text: str, page: _Page) -> None:
    """Only data: images, in-page links, no script, no external URL."""
    assert page.scripts == 0
    srcs = [a["src"] for t, a in page.elements if "src" in a]
    hrefs = [a["href"] for t, a in page.elements if "href" in a]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(h.startswith("#") for h in hrefs)
    assert not any("http" in s for s in srcs + hrefs)
    assert "<link" not in text and "@import" not in text and "url(" not in text


def _check_sections(page: _Page) -> None:
    ids = {a.get("id") for t, a in page.elements if t == "section"}
    assert set(SECTIONS) <= ids


def _groupby_accuracy(labels, probs, patients) -> dict[str, float]:
    """Per-patient accuracy by a plain NumPy group-by (the test's oracle)."""
    ok = np.asarray(probs).argmax(1) == np.asarray(labels)
    pat = np.asarray(patients).astype(str)
    uniq, inv = np.unique(pat, return_inverse=True)
    return dict(zip(uniq.tolist(), (np.bincount(inv, weights=ok) / np.bincount(inv)).tolist()))


def _check_headline_metrics(page: _Page, y, p) -> None:
    """Accuracy, balanced accuracy, macro F1 and AUROC in the page equal scikit-learn's."""
    pred = p.argmax(1)
    assert _metric(page, "accuracy") == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert _metric(page, "balanced_accuracy") == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-9)
    assert _metric(page, "f1") == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0), abs=1e-9)
    auc = skm.roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else skm.roc_auc_score(y, p, multi_class="ovr")
    assert _metric(page, "auroc") == pytest.approx(auc, abs=1e-9)


def _check_counts(text: str, acc: dict[str, float]) -> None:
    """The patient counts above 90 % and below 70 % stated on the page."""
    a = np.array(list(acc.values()))
    assert f"data-count='above-90'>{int((a > 0.9).sum())}</b>" in text
    assert f"data-count='below-70'>{int((a < 0.7).sum())}</b>" in text


@pytest.fixture(scope="module")
def run_report(tmp_path_factory):
    """A tiny trained run (CLI), fake sanity/sequences outputs, and its report built through the CLI."""
    work = str(tmp_path_factory.mktemp("report") / "run")
    r = _lclsc("train", "--workdir", work, "--config", "tiny", "--no-progress")
    assert r.returncode == 0, r.stderr
    os.makedirs(os.path.join(work, "sanity"))
    with open(os.path.join(work, "sanity", "sanity.md"), "w") as f:
        f.write("# Sanity\n\n| method | passes |\n|---|---|\n| gradcam | yes <b> |\n")
    os.makedirs(os.path.join(work, "sequences"))
    with open(os.path.join(work, "sequences", "sequences.json"), "w") as f:
        json.dump({"frame": {"accuracy": 0.5}, "sequence": {"accuracy": 0.75}}, f)
    r = _lclsc("report", work, "--methods", "gradcam", "sc", "--gallery", "1", "--n-boot", "200")
    assert r.returncode == 0, r.stderr
    return work, r


@pytest.mark.slow
def test_run_report_is_complete_self_contained_and_correct(run_report):
    work, proc = run_report
    path = os.path.join(work, "report.html")
    assert f"written: {path}" in proc.stdout
    assert "[report]" in proc.stderr and "saliency gradcam" in proc.stderr  # progress on stderr
    text, page = _parse(path)
    _check_self_contained(text, page)
    _check_sections(page)

    run = runs.load_run(work)
    ds = loop.load_dataset(run.cfg)
    test = runs.run_splits(work, run.cfg, ds)["test"]
    res = runs.predict(run, ds, test)
    y, p = np.asarray(res["label"]), np.asarray(res["probs"])
    _check_headline_metrics(page, y, p)
    acc = _groupby_accuracy(y, p, res["patient"])
    assert _patients(page) == pytest.approx(acc, abs=1e-12)
    _check_counts(text, acc)
    # Every bootstrap interval brackets a rate in [0, 1].
    for key in ("accuracy", "balanced_accuracy", "f1", "auroc"):
        cell = next(c for _, cells in page.rows for c in cells if c.get("data-metric") == key)
        lo, hi = (float(v) for v in cell["_text"].split("[")[1].rstrip("]").split(","))
        assert 0.0 <= lo <= hi <= 1.0
    assert f"{len(test)} test frames of {len(set(res['patient']))} held-out patients" in text
    assert f"step {run.step}" in text

    # Gallery: one case per class and kind where one exists (diagnostic frames), "none" otherwise.
    pred = p.argmax(1)
    diag = np.ones(len(test), bool) if ds.diagnostic is None else np.asarray(ds.diagnostic)[test]
    expect_imgs, expect_none = 0, 0
    for c in range(len(run.class_names)):
        for sel in ((y == c) & (pred == c), (y == c) & (pred != c)):
            if (sel & diag).any():
                expect_imgs += 1
            else:
                expect_none += 1
    gallery = [a for t, a in page.elements if t == "img" and a.get("alt", "").startswith("saliency ")]
    assert len(gallery) == expect_imgs
    assert sum(1 for t, a in page.elements if "data-empty" in a) == expect_none
    assert "methods: gradcam, sc" in text

    # Other commands' results: rendered where present (escaped), a how-to line where not.
    assert "<td>yes &lt;b&gt;</td>" in text
    assert "sequence.accuracy" in text and "0.750" in text
    assert f"lclsc robustness --workdir {work}" in text


@pytest.mark.slow
def test_write_explanations_with_masks_colour_bars(run_report, tmp_path):
    """``write_explanations(masks=...)``: figures are written; a mask of the wrong shape is refused."""
    from lclsc_jax import explain

    work, _ = run_report
    run = runs.load_run(work)
    ds = loop.load_dataset(run.cfg)
    idx = runs.run_splits(work, run.cfg, ds)["test"][:2]
    u8 = np.stack([ds.source[int(i)]["image"] for i in idx])
    masks = np.stack([ds.source[int(i)]["mask"] for i in idx]).astype(bool)
    out = explain.write_explanations(run.model, run.variables, u8, ["a", "b"], str(tmp_path), "gradcam",
                                     class_names=run.class_names, global_emb=run.global_emb, tau=run.cfg.loss.tau,
                                     masks=masks, progress=False)
    assert sorted(os.path.basename(o) for o in out) == ["a_gradcam.npy", "a_gradcam.png", "b_gradcam.npy",
                                                        "b_gradcam.png"]
    with pytest.raises(ValueError, match="masks must have shape"):
        explain.write_explanations(run.model, run.variables, u8, ["a", "b"], str(tmp_path), "gradcam",
                                   global_emb=run.global_emb, masks=masks[:1], progress=False)


@pytest.mark.slow
def test_cv_report(tmp_path):
    """A 2-fold CV study: pooled and fold-mean numbers equal sklearn on the folds' saved predictions."""
    work = str(tmp_path / "cv")
    r = _lclsc("cv", "--workdir", work, "--config", "tiny", "--folds", "2", "--no-progress", "--no-figures")
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "out" / "cv.html")
    r = _lclsc("report", work, "--out", out, "--methods", "gradcam", "--gallery", "1", "--n-boot", "100",
               "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --no-progress
    text, page = _parse(out)
    _check_self_contained(text, page)
    _check_sections(page)
    folds = []
    for k in range(2):
        with np.load(os.path.join(work, f"fold_{k:02d}", "predictions.npz")) as z:
            folds.append({key: z[key] for key in z.files})
    y = np.concatenate([f["label"] for f in folds])
    p = np.concatenate([f["probs"] for f in folds])
    pat = np.concatenate([f["patient"] for f in folds]).astype(str)
    _check_headline_metrics(page, y, p)
    fold_acc = [skm.accuracy_score(f["label"], f["probs"].argmax(1)) for f in folds]
    assert _metric(page, "accuracy", "data-fold-mean") == pytest.approx(np.mean(fold_acc), abs=1e-12)
    acc = _groupby_accuracy(y, p, pat)
    assert len(acc) == 9  # every patient of the tiny simulator, held out once
    assert _patients(page) == pytest.approx(acc, abs=1e-12)
    _check_counts(text, acc)
    assert "2-fold cross-validation study" in text


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    """Not a workdir, a missing folder, an unfinished CV, a negative gallery: exit 2, one line, no traceback."""
    from lclsc_jax import cli

    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "cv"
    unfinished.mkdir()
    (unfinished / "cv_config.json").write_text("{}")
    r = _lclsc("report", str(empty))  # the front door once
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"lclsc report: error: {empty} is not a training workdir (no config.json/splits.json) "
                                "nor a cross-validation study (no cv_summary.json); run `lclsc train` or `lclsc cv` "
                                "first")
    for argv, needle in (([str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such folder"),
                         ([str(unfinished)], f"{unfinished} is an unfinished cross-validation study"),
                         ([str(empty), "--gallery", "-1"], "--gallery) must be >= 0, got -1"),
                         ([str(empty), "--n-boot", "0"], "--n-boot) must be >= 1, got 0")):
        assert cli.main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1
    assert not (empty / "report.html").exists()


def test_gallery_cases_and_bootstrap_on_known_arrays():
    """Gallery rows by hand; the intervals' point estimates equal sklearn, intervals ordered (no training)."""
    from lclsc_jax.protocols import report

    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55], [0.1, 0.9]])
    rows = report.gallery_cases(y, p, 2, per_class=2, eligible=[True, True, True, True, True, False])
    assert rows == [(0, "correct", [0, 1]), (0, "wrong", [2]), (1, "correct", [3, 4]), (1, "wrong", [])]
    pats = np.array(["a", "a", "b", "c", "c", "d"])
    from lclsc_jax.evaluate.statistics import metric_intervals

    ci = metric_intervals(p, y, pats, n_boot=300)
    pred = p.argmax(1)
    assert ci["accuracy"]["estimate"] == pytest.approx(skm.accuracy_score(y, pred))
    assert ci["auroc"]["estimate"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    assert ci["f1"]["estimate"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    for v in ci.values():
        assert 0.0 <= v["ci_low"] <= v["ci_high"] <= 1.0
    assert report.per_patient_accuracy(y, p, pats) == {
        "a": {"n": 2, "accuracy": 1.0, "correct": 2}, "b": {"n": 1, "accuracy": 0.0, "correct": 0},
        "c": {"n": 2, "accuracy": 1.0, "correct": 2}, "d": {"n": 1, "accuracy": 1.0, "correct": 1}}


def test_html_blocks_escape_data_and_refuse_external_images():
    from lclsc_jax.protocols import report_html as H

    md = H.markdown("# T <x>\n\nsome `code` & **bold**\n\n| a | b |\n|---|---|\n| <i> | 1 |\n")
    assert md == ("<h3>T &lt;x&gt;</h3><p>some <code>code</code> &amp; <b>bold</b></p>"
                  "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>&lt;i&gt;</td><td>1</td></tr>"
                  "</tbody></table>")
    assert H.table(["h"], [[("x\"", {"data-v": "<1>"})], [0.5]]) == (
        '<table><thead><tr><th>h</th></tr></thead><tbody><tr><td data-v="&lt;1&gt;">x&quot;</td></tr>'
        '<tr><td class="num">0.500</td></tr></tbody></table>')
    with pytest.raises(ValueError, match="data: URIs"):
        H.img("http://example.org/a.png", "a")
