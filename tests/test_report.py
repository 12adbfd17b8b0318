"""OUT/report.html (issue 17): one self-contained page per batch, written at the end of every run
and by ``wsi-nuclei report OUT``; checked as HTML and, where Chromium is installed, as a page a
browser renders (``.ci/run`` installs it, so CI runs that test)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.pipeline.segment import SegmentConfig, segment_many

from .browser import Browser, find_chromium
from .slides import disc_slide

runner = CliRunner()
FLAGS = ["--chunk-size", "256", "--halo", "32", "--context", "64", "--workers", "0", "--quiet"]
OPTS = {"chunk_size": 256, "halo": 32, "context": 64}


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """One CLI batch: two slides that finish, one file that is no slide, one path that is not there."""
    src = tmp_path_factory.mktemp("inputs")
    disc_slide(src / "dense.tif", (512, 256), seed=41)
    disc_slide(src / "sparse.tif", (256, 256), seed=42, spacing=48)
    (src / "broken.svs").write_text("<not a slide>\n")  # the reason quotes it: HTML must be escaped
    out = tmp_path_factory.mktemp("out")
    result = runner.invoke(app, ["segment", str(src), str(src / "missing.svs"), "-o", str(out), *FLAGS])
    assert result.exit_code == 1, result.output
    return {"out": out, "src": src, "run": json.loads((out / "run.json").read_text())}


class _Rows(HTMLParser):
    """The report's table rows: class, cells' text and the img data: URIs."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        a = dict(attrs)
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append({"class": a.get("class", ""), "cells": [], "images": []})
        elif tag == "td" and self.rows:
            self._cell = []
        elif tag == "img" and self.rows:
            self.rows[-1]["images"].append(a["src"])

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):  # noqa: ANN001
        if self._cell is not None:
            self._cell.append(data + " ")


def _parse(path: Path) -> list[dict]:
    p = _Rows()
    p.feed(path.read_text(encoding="utf-8"))
    return p.rows


def test_the_run_writes_one_row_per_slide_failed_first(batch):
    out, run = batch["out"], batch["run"]
    rows = _parse(out / "report.html")
    assert len(rows) == len(run["slides"]) == 4
    assert [r["class"] for r in rows] == ["failed", "failed", "ok", "ok"]
    failed = {s["slide"]: s for s in run["slides"] if s["status"] == "failed"}
    for row in rows[:2]:
        reason = next(s["reason"] for p, s in failed.items() if Path(p).name in row["cells"][1])
        assert " ".join(reason.split()) == row["cells"][2]  # the error line, whole, where the pictures would be
        assert row["images"] == []
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "<not a slide>" not in text  # quoted from the reason, escaped
    summaries = {json.loads((out / n / "summary.json").read_text())["slide"]: json.loads((out / n / "summary.json").read_text())
                 for n in ("dense", "sparse")}
    for row in rows[2:]:
        summary = next(s for p, s in summaries.items() if Path(p).name in row["cells"][1])
        assert row["cells"][4] == f"{summary['nuclei']:,}" and row["cells"][5] == f"{summary['tissue_mm2']:,.2f}"
        assert row["cells"][6] == f"{summary['nuclei'] / summary['tissue_mm2']:,.0f}" and row["cells"][8] == summary["model"]
        assert len(row["images"]) == 2
        for uri in row["images"]:
            head, data = uri.split(",", 1)
            assert head == "data:image/jpeg;base64"
            img = Image.open(io.BytesIO(base64.b64decode(data)))
            img.load()
            assert img.width > 50 and img.height > 50
    total = sum(s["nuclei"] for s in summaries.values())
    assert re.search(rf"<b>{total:,}</b> nuclei", text) and "4</b> slides: 2 ok, 2 failed" in text
    assert "http://" not in text and "https://" not in text  # nothing from a network
    assert 'href="dense/overlay.png"' in text and 'href="sparse/density.png"' in text  # the full pictures, relative to OUT


def test_the_report_command_writes_the_same_file_again(batch):
    out = batch["out"]
    before = (out / "report.html").read_bytes()
    (out / "report.html").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0 and result.output.strip() == str(out / "report.html")
    assert (out / "report.html").read_bytes() == before


def test_pictures_of_the_previous_report_are_reused_while_their_files_are_unchanged(batch, monkeypatch):
    from PIL import Image as PILImage

    from wsi_nuclei.outputs.report import write_report

    out = batch["out"]
    before = (out / "report.html").read_bytes()
    opened: list = []
    real_open = PILImage.open
    monkeypatch.setattr(PILImage, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    write_report(out)
    assert opened == [] and (out / "report.html").read_bytes() == before  # nothing decoded, the same page
    density = out / "sparse" / "density.png"
    st = density.stat()
    os.utime(density, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new version of one picture
    try:
        write_report(out)
        assert [Path(p) for p in opened] == [density]
    finally:
        os.utime(density, ns=(st.st_atime_ns, st.st_mtime_ns))
        write_report(out)


def test_a_moved_out_folder_reports_its_own_files(batch, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "moved"
    shutil.copytree(batch["out"], out)
    summary = json.loads((out / "dense" / "summary.json").read_text())
    summary["nuclei"] = 12345  # only the copy says so
    (out / "dense" / "summary.json").write_text(json.dumps(summary))
    monkeypatch.chdir(tmp_path)  # and the command runs elsewhere, with a relative path
    result = runner.invoke(app, ["report", "moved"])
    assert result.exit_code == 0, result.output
    rows = {r["cells"][1].split()[0]: r for r in _parse(out / "report.html")}
    assert rows["dense.tif"]["cells"][4] == "12,345" and len(rows["dense.tif"]["images"]) == 2
    assert 'href="dense/overlay.png"' in (out / "report.html").read_text(encoding="utf-8")


def test_a_folder_without_run_json_still_gets_its_finished_slides(batch, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(batch["out"], out)
    (out / "run.json").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0
    assert [r["class"] for r in _parse(out / "report.html")] == ["ok", "ok"]


@pytest.mark.parametrize("case", ["missing", "empty", "a-file"])
def test_report_of_a_folder_without_outputs_is_one_line(tmp_path, case):
    target = tmp_path / "x"
    if case == "empty":
        target.mkdir()
    elif case == "a-file":
        target.write_text("")
    result = runner.invoke(app, ["report", str(target)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(target) in lines[0]


def test_a_stopped_run_still_writes_its_report(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    disc_slide(src / "a.tif", (256, 256), seed=43)
    disc_slide(src / "b.tif", (256, 256), seed=44)
    done: list = []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after the first slide (segment_many's stop)
        segment_many([src], tmp_path / "out", SegmentConfig(**OPTS), on_slide=done.append, max_slides=1, stop=lambda: bool(done))
    rows = _parse(tmp_path / "out" / "report.html")
    assert [r["class"] for r in rows] == ["interrupted", "ok"]
    assert "--resume" in rows[0]["cells"][2]


def test_a_report_that_cannot_be_written_is_a_warning_not_a_failed_run(tmp_path, caplog):
    slide = disc_slide(tmp_path / "a.tif", (256, 256), seed=45)
    out = tmp_path / "out"
    (out / "report.html").mkdir(parents=True)  # a folder where the report goes
    with caplog.at_level("WARNING"):
        (res,) = segment_many([slide], out, SegmentConfig(**OPTS))
    assert res.status == "ok" and (out / "run.json").exists()
    (warning,) = [r.getMessage() for r in caplog.records if "report" in r.getMessage()]
    assert "report.html" in warning and f"wsi-nuclei report {out}" in warning and "\n" not in warning


def test_unusual_densities_are_flagged_and_come_first(tmp_path):
    from wsi_nuclei.outputs.report import SlideRow, _flagged, _rank, render_report

    rows = [
        SlideRow(f"s{i}.svs", f"/x/s{i}.svs", None, "ok", nuclei=n, tissue_mm2=1.0) for i, n in enumerate([1000, 1100, 900, 300, 5000, 0])
    ]
    flagged = {r.name: r.flag for r in _flagged(rows)}
    assert flagged == {"s0.svs": "", "s1.svs": "", "s2.svs": "", "s3.svs": "few nuclei", "s4.svs": "many nuclei", "s5.svs": "no nuclei"}
    assert sorted(_flagged(rows), key=_rank)[0].flag  # before the slides that look normal
    two = _flagged(rows[:2] + [SlideRow("f.svs", "/x/f.svs", None, "failed", "<b>boom</b>")])
    assert all(not r.flag for r in two)  # no median of fewer than three
    html = render_report(two, tmp_path)
    assert "&lt;b&gt;boom&lt;/b&gt;" in html and "<b>boom</b>" not in html


# in a real browser --------------------------------------------------------------------------------

_PAGE = """JSON.stringify({
  rows: Array.from(document.querySelectorAll("#slides tbody tr")).map(r => ({
    status: r.className, text: r.innerText,
    errors: Array.from(r.querySelectorAll(".error")).map(e => ({text: e.innerText, height: e.getBoundingClientRect().height,
      shown: getComputedStyle(e).visibility === "visible" && getComputedStyle(e).display !== "none"})),
    images: Array.from(r.querySelectorAll("img")).map(i => ({width: i.naturalWidth, height: i.naturalHeight, complete: i.complete}))})),
  totals: document.querySelector(".totals").innerText})"""


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        if os.environ.get("WSI_NUCLEI_REQUIRE_BROWSER"):
            pytest.fail("WSI_NUCLEI_REQUIRE_BROWSER is set but no chromium is on PATH (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH: apt-get install chromium (.ci/run does, so CI runs this test)")
    return binary


def test_the_report_renders_in_chromium(batch, chromium, tmp_path):
    out, run = batch["out"], batch["run"]
    with Browser(chromium) as browser:
        browser.open(out / "report.html")
        page = json.loads(browser.evaluate(_PAGE))
        browser.screenshot(tmp_path / "report.png")  # docs/img/report.png is made the same way (docs/results.md)
        rows = page["rows"]
        assert len(rows) == len(run["slides"])
        assert [r["status"] for r in rows] == ["failed", "failed", "ok", "ok"]
        for slide in (s for s in run["slides"] if s["status"] == "failed"):
            row = next(r for r in rows if Path(slide["slide"]).name in r["text"])
            (error,) = row["errors"]
            assert error["shown"] and error["height"] > 0
            assert " ".join(error["text"].split()) == " ".join(slide["reason"].split())
        images = [i for r in rows for i in r["images"]]
        assert len(images) == 4 and all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images)  # decoded
        assert "4 slides: 2 ok, 2 failed" in page["totals"]
        # a click on a heading sorts by that column (nuclei: ascending, failed slides' "—" as -1 first)
        browser.evaluate("Array.from(document.querySelectorAll('th')).find(th => th.textContent === 'nuclei').click()")
        order = browser.evaluate(
            "Array.from(document.querySelectorAll('#slides tbody tr')).map(r => r.querySelector('td[data-col=\"4\"]').dataset.sort)"
        )
        assert [float(v) for v in order] == sorted(float(v) for v in order) and len(set(order)) > 1
    shot = Image.open(tmp_path / "report.png")
    assert shot.width == 1280 and len(np.unique(np.asarray(shot.convert("L")))) > 10  # a drawn page, not a blank one
