"""The HTML report in a real headless browser (Chromium through Playwright), offline.

The page must load from ``file://`` without console errors or page errors, every ``<img>`` must
be decoded (``complete`` with ``naturalWidth > 0``), and a full-page screenshot is kept as a test
artefact (``test-artifacts/report.png`` at the repository root). Skipped, with the reason, only
where Chromium (``/usr/bin/chromium``, ``make browser``) or Playwright is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACT = Path(__file__).resolve().parents[1] / "test-artifacts" / "report.png"
#: Flags for a machine without network: without them Chromium stalls on background requests.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _lclsc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *args], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (install it with `make browser`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (extra 'browser')")
    work = str(tmp_path / "run")
    r = _lclsc("train", "--workdir", work, "--config", "tiny", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _lclsc("report", work, "--methods", "gradcam", "eigencam", "--gallery", "1", "--n-boot", "100",
               "--no-progress")
    assert r.returncode == 0, r.stderr
    url = Path(work, "report.html").resolve().as_uri()
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("request", lambda q: requests.append(q.url))
            page.goto(url, wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACT), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # nothing fetched from a network
    assert len(images) >= 8  # ROC, 2 confusion, reliability, patients, confidence, threshold, gallery
    assert all(ok and width > 0 for _, ok, width in images), [i for i in images if not (i[1] and i[2] > 0)]
    assert {"metrics", "roc", "calibration", "patients", "confidence", "gallery"} <= set(sections)
    assert ARTIFACT.stat().st_size > 10_000 and ARTIFACT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
