"""``OUT/report.html``: one page for a batch, a row per slide, readable without the tool.

:func:`collect_rows` reads what a batch left in ``OUT``: ``run.json`` (every slide of the runs
into OUT, with its status and, for a failure, its one-line reason) and each slide folder's
``summary.json`` (counts, tissue, seconds, model; folders that ``run.json`` does not list are
included as finished). :func:`render_report` turns the rows into one self-contained HTML file:
the pictures (``overlay.png``, ``density.png``) are embedded as small JPEGs and link to the full
files, there is no network access and no script beyond a few lines that sort the table when a
heading is clicked. Rows are ordered failed first, then interrupted, then slides whose density
is far from the batch's (below half or above twice the median nuclei per mm² of tissue, among
at least three finished slides), then the rest by name.

:func:`write_report` writes it atomically; ``wsi-nuclei segment`` does at the end of every run
(after a failure or Ctrl-C too) and ``wsi-nuclei report OUT`` regenerates it. A picture already
embedded in the previous report.html is taken from there while its file is unchanged (path, size,
mtime), so writing the report of a few hundred slides after each run decodes only the new ones.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import atomic
from .._version import __version__
from ..errors import OutputError, shown
from .folder import read_json

__all__ = ["SlideRow", "collect_rows", "render_report", "write_report", "REPORT_NAME"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
#: Longest side of the embedded pictures, px (the links open the full files).
THUMB_PX = {"overlay": 200, "density": 280}
_ORDER = {"failed": 0, "interrupted": 1}


@dataclass(frozen=True)
class SlideRow:
    """One slide of the report; numbers are None where the slide has no finished outputs."""

    name: str
    slide: str
    folder: Path | None
    status: str
    reason: str = ""
    nuclei: int | None = None
    tissue_mm2: float | None = None
    seconds: float | None = None
    model: str = ""
    flag: str = ""  # "no nuclei", "few nuclei", "many nuclei" (against the batch's median density)
    #: a typed model's nuclei per mm² of tissue, per type (QuPath class name); empty otherwise
    types: tuple[tuple[str, float], ...] = ()

    @property
    def per_mm2(self) -> float | None:
        if self.nuclei is None or not self.tissue_mm2:
            return None
        return self.nuclei / self.tissue_mm2

    @property
    def finished(self) -> bool:
        return self.status in ("ok", "skipped") and self.nuclei is not None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _row(entry: dict[str, Any], folder: Path | None) -> SlideRow:
    slide = str(entry.get("slide", ""))
    status = str(entry.get("status", "unknown"))
    reason = " ".join(str(entry.get("reason", "")).split())  # one line
    summary = read_json(folder / "summary.json") if folder is not None else None
    name = Path(slide).name or (folder.name if folder is not None else "?")
    if summary is None or status not in ("ok", "skipped"):
        return SlideRow(name, slide, folder, status, reason, seconds=_number(entry.get("seconds")) or None)
    nuclei = _number(summary.get("nuclei"))
    seconds = _number(entry.get("seconds")) if status == "ok" else None
    if not seconds:  # skipped: the run that made the outputs
        times = summary.get("seconds")
        times = times if isinstance(times, dict) else {}
        seconds = sum(v for v in (_number(times.get("wall")), _number(times.get("assemble"))) if v is not None) or None
    raw = summary.get("types")
    types = tuple((str(k), float(v["per_mm2"])) for k, v in raw.items()
                  if isinstance(v, dict) and _number(v.get("per_mm2")) is not None) if isinstance(raw, dict) else ()
    return SlideRow(name, slide or str(summary.get("slide", "")), folder, status, reason, int(nuclei) if nuclei is not None else None,
                    _number(summary.get("tissue_mm2")), seconds, str(summary.get("model", "")), types=types)


def _flagged(rows: list[SlideRow]) -> list[SlideRow]:
    from dataclasses import replace

    densities = [d for r in rows if r.finished and (d := r.per_mm2) is not None and d > 0]
    median = statistics.median(densities) if len(densities) >= 3 else None
    out = []
    for r in rows:
        flag = ""
        if r.finished and r.nuclei == 0:
            flag = "no nuclei"
        elif r.finished and median is not None and (d := r.per_mm2) is not None:
            flag = "few nuclei" if d < median / 2 else "many nuclei" if d > 2 * median else ""
        out.append(replace(r, flag=flag) if flag else r)
    return out


def _rank(row: SlideRow) -> int:
    """Report order: failed 0, interrupted 1, unusual or unknown 2, finished 3."""
    if row.status in _ORDER:
        return _ORDER[row.status]
    return 3 if row.finished and not row.flag else 2


def collect_rows(out: Path | str) -> tuple[list[SlideRow], dict[str, Any]]:
    """The report's rows for ``out`` (in report order) and the run's record (``run.json``'s
    ``state`` and ``version``; empty without one). Raises OutputError when ``out`` is not a
    folder or holds neither a ``run.json`` nor a slide folder with a ``summary.json``."""
    out = Path(out)
    if not out.is_dir():
        raise OutputError(f"{shown(out)}: folder not found; give the -o folder of a wsi-nuclei segment run")
    run = read_json(out / "run.json") or {}
    entries = [e for e in run.get("slides", []) if isinstance(e, dict)] if isinstance(run.get("slides"), list) else []
    rows: list[SlideRow] = []
    seen: set[str] = set()
    for entry in entries:
        out_dir = str(entry.get("out_dir") or "")
        # a slide's folder is OUT/<name>: found there even when run.json recorded it relative to
        # another working directory, or OUT was moved since
        folder = (out / Path(out_dir).name if (out / Path(out_dir).name).is_dir() else Path(out_dir)) if out_dir else None
        if folder is not None:
            seen.add(os.path.realpath(folder))
        rows.append(_row(entry, folder))
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if os.path.realpath(folder) in seen:
            continue
        summary = read_json(folder / "summary.json")
        if summary is not None:  # finished by a run that run.json no longer lists
            rows.append(_row({"slide": summary.get("slide", ""), "status": "ok", "out_dir": str(folder)}, folder))
    if not rows:
        raise OutputError(f"{shown(out)}: holds no wsi-nuclei outputs (no run.json, no <slide>/summary.json); "
                          "give the -o folder of a wsi-nuclei segment run")
    rows = _flagged(rows)
    rows.sort(key=lambda r: (_rank(r), r.name.lower(), r.slide))
    return rows, {"state": run.get("state", ""), "version": run.get("version", "")}


def _picture(path: Path, longest: int, cache: dict[str, str]) -> tuple[str, str]:
    """(data: URI, key) of ``path`` shrunk to ``longest`` px (JPEG); ("", "") when it cannot be
    read. The key names the source file (path, size, mtime): ``cache`` maps keys to the URIs of
    the report written before, so a report of a few hundred slides, written again after every
    run, decodes only the pictures that changed."""
    from PIL import Image, UnidentifiedImageError

    try:
        st = path.stat()
    except OSError:
        return "", ""
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{longest}".encode()).hexdigest()
    if key in cache:
        return cache[key], key
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return "", ""
    img.thumbnail((longest, longest), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85, optimize=True)
    return _URI + base64.b64encode(buf.getvalue()).decode(), key


_EMBEDDED = re.compile(r'<img class="\w+" data-key="([0-9a-f]{40})" src="(data:image/jpeg;base64,[A-Za-z0-9+/=]+)"')


def _embedded(report: Path) -> dict[str, str]:
    """The pictures a report already holds, by key (empty when there is none)."""
    try:
        text = report.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    return dict(_EMBEDDED.findall(text))


_URI = "data:image/jpeg;base64,"


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _cell(text: str, sort: Any = None, cls: str = "", col: int | None = None, span: int = 1) -> str:
    attrs = ((f' data-sort="{_esc(sort)}"' if sort is not None else "") + (f' class="{cls}"' if cls else "")
             + (f' data-col="{col}"' if col is not None else "") + (f' colspan="{span}"' if span > 1 else ""))
    return f"<td{attrs}>{text}</td>"


def _esc(value: object) -> str:
    """HTML text of ``value``: a name that is not UTF-8 shows its bytes as ``\\xNN`` (:func:`shown`)."""
    return html.escape(shown(value))


def _link_picture(row: SlideRow, out: Path, kind: str, cache: dict[str, str]) -> str:
    if row.folder is None or not row.finished:
        return ""
    path = row.folder / f"{kind}.png"
    uri, key = _picture(path, THUMB_PX[kind], cache)
    if not uri:
        return '<span class="none">missing</span>'
    try:
        href = quote(os.fsencode(os.path.relpath(path, out)))  # the name's bytes, also when they are not UTF-8
    except ValueError:  # another drive (Windows)
        href = quote(os.fsencode(str(path)))
    return f'<a href="{html.escape(href)}"><img class="{kind}" data-key="{key}" src="{uri}" alt="{kind} of {_esc(row.name)}"></a>'


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
.totals{display:flex;flex-wrap:wrap;gap:.6em 1.6em;margin:.6em 0 1.2em;padding:.7em 1em;background:#f3f4f6;border-radius:6px}
.totals b{font-size:1.15em}
table{border-collapse:collapse;width:100%}
th{position:sticky;top:0;background:#e5e7eb;text-align:left;padding:.4em .5em;cursor:pointer;user-select:none;vertical-align:bottom}
th:after{content:" \\2195";color:#888;font-size:.8em}
td{padding:.4em .5em;border-top:1px solid #ddd;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.failed{background:#fdecec}
tr.interrupted{background:#fff7e0}
.status{font-weight:600;text-transform:uppercase;font-size:.85em}
tr.failed .status{color:#b91c1c}
tr.interrupted .status{color:#b45309}
.error{color:#b91c1c;font-family:ui-monospace,monospace;font-size:.85em;max-width:60em;word-break:break-word}
.flag{display:inline-block;margin-top:.3em;padding:0 .4em;border-radius:4px;background:#fde68a;font-size:.85em}
.path{color:#666;font-size:.8em;word-break:break-all}
td.slide{min-width:14em;max-width:24em}
td.model{font-size:.75em;word-break:break-all;max-width:9em}
img{display:block;border:1px solid #ccc}
.none{color:#999}
"""

_SORT = """
document.querySelectorAll("th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.dir !== "up"; th.dataset.dir = up ? "up" : "down";
    var key = function (r) { var c = r.querySelector('td[data-col="' + col + '"]'),
                                 v = !c ? "" : c.dataset.sort !== undefined ? c.dataset.sort : c.textContent;
                             var n = parseFloat(v); return isNaN(n) ? v.toLowerCase() : n; };
    rows.sort(function (a, b) { var x = key(a), y = key(b); if (typeof x !== typeof y) { x = String(x); y = String(y); }
                                return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def render_report(rows: list[SlideRow], out: Path | str, run: dict[str, Any] | None = None, cache: dict[str, str] | None = None) -> str:
    """The HTML of the report for ``rows`` (as :func:`collect_rows` gives them) of the batch in
    ``out``; ``cache``: pictures already made, by key (see :func:`_picture`)."""
    out = Path(out)
    run = run or {}
    cache = cache if cache is not None else {}
    esc = _esc
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    done = [r for r in rows if r.finished]
    nuclei = sum(r.nuclei or 0 for r in done)
    tissue = sum(r.tissue_mm2 or 0.0 for r in done)
    seconds = sum(r.seconds or 0.0 for r in rows)
    models = sorted({r.model for r in done if r.model})
    flagged = sum(1 for r in rows if r.flag)
    known = ["ok", "skipped", "failed", "interrupted"]
    by_status = ", ".join(f"{counts[s]} {s}" for s in known + sorted(set(counts) - set(known)) if s in counts)
    state = f" (run {esc(str(run['state']))})" if run.get("state") and run.get("state") != "finished" else ""
    totals = [f"<span><b>{len(rows)}</b> slides: {esc(by_status)}{state}</span>",
              f"<span><b>{nuclei:,}</b> nuclei</span>", f"<span><b>{tissue:,.2f}</b> mm² of tissue</span>",
              f"<span><b>{_fmt(nuclei / tissue if tissue else None)}</b> nuclei per mm²</span>",
              f"<span><b>{seconds:,.0f}</b> s</span>",
              f"<span>model <b>{esc(', '.join(models) or '—')}</b></span>"]
    if flagged:
        totals.append(f'<span class="flag">{flagged} with unusual nucleus counts</span>')
    type_names = list(dict.fromkeys(name for r in rows for name, _ in r.types))
    head = ("status", "slide", "overlay", "density", "nuclei", "tissue mm²", "nuclei per mm²",
            *(f"{name} per mm²" for name in type_names), "seconds", "model")
    k = len(type_names)
    body = []
    for r in rows:
        slide = f'<b>{esc(r.name)}</b><div class="path">{esc(r.slide)}</div>'
        if r.flag:
            slide += f'<span class="flag">{esc(r.flag)}</span>'
        if r.status == "skipped":
            slide += '<div class="path">finished in an earlier run</div>'
        if r.status not in ("ok", "skipped") and r.reason:  # the error line where the pictures would be
            middle = [_cell(f'<div class="error">{esc(r.reason)}</div>', col=2, span=2)]
        else:
            middle = [_cell(_link_picture(r, out, "overlay", cache), col=2), _cell(_link_picture(r, out, "density", cache), col=3)]
        cells = [_cell(f'<span class="status">{esc(r.status)}</span>', _rank(r), col=0), _cell(slide, r.name.lower(), "slide", 1), *middle,
                 _cell(_fmt(r.nuclei), r.nuclei if r.nuclei is not None else -1, "num", 4),
                 _cell(_fmt(r.tissue_mm2, 2), r.tissue_mm2 if r.tissue_mm2 is not None else -1, "num", 5),
                 _cell(_fmt(r.per_mm2), r.per_mm2 if r.per_mm2 is not None else -1, "num", 6),
                 *(_cell(_fmt(dict(r.types).get(name)), dict(r.types).get(name, -1), "num", 7 + i) for i, name in enumerate(type_names)),
                 _cell(_fmt(r.seconds, 1), r.seconds if r.seconds is not None else -1, "num", 7 + k),
                 _cell(esc(r.model), cls="model", col=8 + k)]
        body.append(f'<tr class="{esc(r.status)}">' + "".join(cells) + "</tr>")
    title = f"wsi-nuclei report: {out.resolve().name}"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"generator\" content=\"wsi-nuclei\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{esc(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            f"<h1>{esc(title)}</h1>\n<div class=\"totals\">{''.join(totals)}</div>\n"
            f"<table id=\"slides\"><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead>\n<tbody>\n"
            + "\n".join(body) + "\n</tbody></table>\n"
            f"<p class=\"path\">Written by wsi-nuclei {esc(__version__)} from {esc(str(out / 'run.json'))} and each slide's summary.json; "
            "click a heading to sort, a picture to open it whole. Unusual: below half or above twice the batch's median nuclei "
            "per mm² of tissue (at least three finished slides).</p>\n"
            f"<script>{_SORT}</script>\n</body></html>\n")


def written_by_us(path: Path) -> bool:
    """Whether ``path`` (an existing ``report.html`` or ``run.json``) was written by wsi-nuclei:
    a report names its generator in its head, a run record is JSON with ``version`` and ``slides``."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and "version" in data and isinstance(data.get("slides"), list)
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except (OSError, ValueError):
        return False
    return b'<meta name="generator" content="wsi-nuclei"' in head or b"<title>wsi-nuclei report" in head


def check_ours(out: Path) -> None:
    """Raise OutputError when ``out`` holds a ``run.json`` or ``report.html`` that wsi-nuclei did not
    write (a user's own files): a batch would replace them."""
    for name in ("run.json", REPORT_NAME):
        target = out / name
        if (target.is_file() or target.is_symlink()) and not written_by_us(target):
            raise OutputError(f"{shown(target)}: exists and was not written by wsi-nuclei; a batch writes its {name} there: "
                              "move that file, or choose another -o")


def write_report(out: Path | str) -> Path:
    """Collect, render and write ``out/report.html`` atomically; returns its path. Raises
    OutputError when ``out`` holds no outputs, a report.html of someone else's, or the file
    cannot be written."""
    out = Path(out)
    rows, run = collect_rows(out)
    target = out / REPORT_NAME
    check_ours(out)
    text = render_report(rows, out, run, _embedded(target))
    try:
        atomic.write_text(target, text)
    except OSError as err:
        raise OutputError(f"{shown(target)}: cannot write the report ({err.strerror or err}); free disk space, then run "
                          f"wsi-nuclei report {shown(out)}") from None
    log.info("%s: report of %d slides", target, len(rows))
    return target
