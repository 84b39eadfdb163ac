"""`trainer/main.py report RUN`: the summary, the HTML page (opened in a real headless Chromium), a run
still training, and user errors. The S3 case is in tests/test_s3_run.py (its bucket run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raytag.launcher.cli import main
from raytag.trainer.plots import PLOTS
from tests.helpers import ROOT

CHROMIUM = "/usr/bin/chromium"  # Debian's package; `make test` installs it when missing (root, apt-get)
# This machine's network is closed: no first-run, sync, component or background fetches.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def open_in_chromium(page: Path) -> dict:
    """Load `page` in headless Chromium; return what rendered: each image's natural width, the
    ids of the sections and the number of result rows and worst sentences. Skips where Chromium
    or playwright is missing, but fails under CI (CI=true), which must have them."""
    missing = None
    if not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} is absent (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is absent (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI must run the browser check: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            tab.goto(page.resolve().as_uri(), wait_until="load")
            return tab.evaluate(
                """() => ({
                    images: Array.from(document.images).map(i => ({
                        alt: i.alt, complete: i.complete, width: i.naturalWidth, src: i.src.slice(0, 22)})),
                    sections: Array.from(document.querySelectorAll("h2[id]")).map(h => h.id),
                    resultRows: document.querySelectorAll("#results ~ table tbody tr").length,
                    worst: document.querySelectorAll(".sent").length,
                    marked: document.querySelectorAll(".sent .ent").length,
                    title: document.title,
                })"""
            )
        finally:
            browser.close()


@pytest.mark.slow
def test_report_of_the_demo_run_renders_in_a_browser(demo_run, tmp_path, capsys):
    run_dir, res = demo_run
    page = tmp_path / "page.html"
    assert main(["report", str(run_dir), "--output", str(page)]) == 0
    out = capsys.readouterr().out
    assert "status" in out and "finished" in out and f"{res['validation']['f1']:.4f}" in out
    assert f"{res['test']['f1']:.4f}" in out and str(page) in out
    html = page.read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS)
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained

    seen = open_in_chromium(page)
    assert len(seen["images"]) == len(PLOTS), seen["images"]
    for img in seen["images"]:  # every plot decoded: no broken image
        assert img["complete"] and img["width"] > 0 and img["src"].startswith("data:image/png"), img
    assert {"summary", "plots", "results", "worst", "config", "provenance"} <= set(seen["sections"])
    assert seen["resultRows"] >= 2  # validation and test (and the per-type table after it)
    assert seen["worst"] == 20 and seen["marked"] > 20, seen
    assert seen["title"] == "raytag report: demo"


@pytest.mark.slow
def test_report_of_a_run_still_training(demo_run, tmp_path, capsys):
    # The demo run as it was before it finished: no results.json, model/ or predictions/ yet.
    run_dir, _ = demo_run
    live = tmp_path / "live"
    shutil.copytree(
        run_dir, live, ignore=shutil.ignore_patterns("checkpoints", "model", "predictions", "*.html")
    )
    (live / "results.json").unlink()
    assert main(["report", str(live)]) == 0  # default: <RUN>/report.html
    out = capsys.readouterr().out
    assert "still training" in out and re.search(r"^test F1 +not yet", out, re.M), out
    html = (live / "report.html").read_text()
    assert "still training" in html and "Latest evaluations" in html and "Not available yet" in html
    assert html.count("data:image/png;base64,") == 2  # the curves and the latest per-type scores


def test_report_errors_are_one_line_with_status_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for target, says in ((tmp_path / "nope", "no such run"), (tmp_path / "empty", "is not a run")):
        p = subprocess.run(
            [sys.executable, str(ROOT / "trainer" / "main.py"), "report", str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raytag: error: ") and says in lines[0], p.stderr


def test_worst_sentences_rank_by_entity_errors_and_escape_text():
    from raytag.trainer.report import RunFiles, render_html, worst_sentences

    words = [["<b>Bob</b>", "&", "Co"], ["Paris"], ["x"]]
    gold = [["B-PER", "O", "B-ORG"], ["B-LOC"], ["O"]]
    pred = [["B-ORG", "O", "O"], ["B-LOC"], ["B-MISC"]]
    assert worst_sentences(words, gold, pred) == [(0, {"wrong type": 1, "missed": 1}), (2, {"spurious": 1})]
    run = RunFiles("r<1>", "/runs/r<1>", [], None, "a: '<script>'", {"validation": (words, gold, pred)})
    html = render_html(run, {})
    assert "&lt;b&gt;Bob&lt;/b&gt;" in html and "<b>Bob</b>" not in html
    assert "&lt;script&gt;" in html and "<script>" not in html and "r&lt;1&gt;" in html
