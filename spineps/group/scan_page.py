"""One page per scan, linked from the group report's table: ``group_T2w_scans/<bids name>.html``
(listed in ``.bidsignore`` through ``group_*``). Self-contained like the report (CSS inline,
the overlay figure embedded as a data URI, no script from anywhere, no network), so a
reviewer can pass or fail a scan from it alone, and the page still works when copied away.

Sections: the overlay figure; the level names with the naming rule, its confidence and its
evidence (each cue's own suggestion, the best candidates and their scores, per-vertebra body
sizes, warnings); the QC flags with what triggered each; the per-level measurements; the
models' provenance (name, version, checksum, precision, engine) and the timings, from the
scan's sidecars.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["SCAN_PAGES_DIR", "VOLATILE_RE", "page_path", "render_scan_page", "write_scan_pages"]

log = logging.getLogger(__name__)

SCAN_PAGES_DIR = "group_T2w_scans"
#: what differs between two runs of the same inputs on a page (the run id, the timings): for
#: tools that compare output trees, ``VOLATILE_RE.sub("", text)``
VOLATILE_RE = re.compile(r"<(span|div) data-volatile='[a-z]+'>.*?</\1>", re.S)
_RUN_KEYS = ("SettingsFile", "RunId")
_REPORT = "group_T2w_report.html"


def _e(x: Any) -> str:
    return html.escape("n/a" if x is None else str(x), quote=True)


def page_path(bids_name: str) -> str:
    """The page of a scan, relative to the output folder."""
    return f"{SCAN_PAGES_DIR}/{bids_name}.html"


def _sidecar(nii: Optional[Path]) -> dict[str, Any]:
    if nii is None:
        return {}
    try:
        return dict(json.loads(nii.with_name(nii.name[: -len(".nii.gz")] + ".json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _num(v: Any, nd: int = 2) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _e(v)
    if not math.isfinite(float(v)):
        return "n/a"
    return _e(round(float(v), nd))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table of already escaped cells."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _figure(out: Path, rec: Any) -> str:
    if not rec.figure or not (out / rec.figure).is_file():
        return "<div class='nofig'>no figure</div>"
    data = base64.b64encode((out / rec.figure).read_bytes()).decode("ascii")
    return f"<img alt='overlay figure of {_e(rec.bids_name)}' src='data:image/png;base64,{data}'>"


def _cut_text(cut: Any) -> str:
    """``[height, depth, width]`` cut flags of a body -> the dimensions the border cuts."""
    if not isinstance(cut, (list, tuple)):
        return "n/a"
    names = [n for n, c in zip(("height", "depth", "width"), cut) if c is True]
    return ", ".join(names) or "none"


def _naming_html(naming: Mapping[str, Any]) -> str:
    """Levels with their body sizes, the rule and confidence, and the naming evidence."""
    if not naming:
        return "<p>No level naming (no instance segmentation).</p>"
    ev = dict(naming.get("evidence") or {})
    levels = list(naming.get("levels") or [])
    bodies = list(ev.get("bodies_mm") or [])
    rows = []
    for i, lv in enumerate(levels):
        b = bodies[i] if i < len(bodies) and isinstance(bodies[i], dict) else {}
        rows.append([_e(lv), _num(b.get("height")), _num(b.get("depth")), _num(b.get("extent")),
                     _e(_cut_text(b.get("cut")))])
    out = [f"<p class='naming'>Rule used: <b>{_e(naming.get('rule'))}</b> (requested: "
           f"{_e(ev.get('rule_requested'))}) &middot; confidence <b>{_num(naming.get('confidence'), 3)}</b>"
           f"{' &middot; variant ' + _e(naming.get('variant')) if naming.get('variant') else ''}</p>",
           _table(["level", "body height (mm)", "body depth (mm)", "extent along spine (mm)",
                   "cut by the border"], rows, "levels")]
    standalone = ev.get("standalone") or {}
    if standalone:
        out.append("<h3>What each cue alone suggests</h3>" + _table(
            ["cue", "levels (top to bottom)"],
            [[_e(k), _e(", ".join(v.get("levels") or []))] for k, v in standalone.items() if isinstance(v, dict)]))
    cands = ev.get("candidates") or []
    if cands:
        out.append("<h3>Best candidate level sequences</h3>" + _table(
            ["top level", "score", "score parts"],
            [[_e(c.get("levels")), _num(c.get("score")),
              _e(", ".join(f"{k} {v}" for k, v in (c.get("parts") or {}).items()))] for c in cands]))
    warnings = list(naming.get("warnings") or [])
    out.append("<h3>Naming warnings</h3>" + ("<ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"
                                              if warnings else "<p class='ok'>none</p>"))
    rest = {k: v for k, v in ev.items() if k not in ("bodies_mm", "standalone", "candidates")}
    out.append("<details><summary>All naming evidence (JSON)</summary><pre>" + _e(json.dumps(rest, indent=1))
               + "</pre></details>")
    return "\n".join(out)


def _qc_html(rec: Any) -> str:
    """Each flag with its meaning and what triggered it."""
    from spineps.measure.qc import FLAG_CODES

    qc = rec.qc or {}
    triggers = {
        "gap": "; ".join(qc.get("gaps") or []), "missing_disc": ", ".join(qc.get("missing_discs") or []),
        "size": "; ".join(qc.get("size_flags") or []),
        "inconsistent": f"disagreeing fraction {_num(qc.get('inconsistent_fraction'), 4)}",
        "naming_uncertain": "; ".join([f"confidence {_num(rec.naming.get('confidence'), 3)}",
                                       *(qc.get("naming_warnings") or [])]),
        "order": ", ".join(qc.get("levels") or []),
        "outlier": "; ".join(f"{o.key[0]} {o.key[1]} {o.key[2]} = {o.value:.2f} (median {o.median:.2f}, "
                             f"z {o.z:+.1f})" for o in rec.outliers),
    }
    flags = list(qc.get("flags") or [])
    if rec.outliers and "outlier" not in flags:
        flags.append("outlier")
    rows = [[f"<span class='flag'>{_e(f)}</span>", _e(FLAG_CODES.get(f, f)), _e(triggers.get(f) or "")]
            for f in flags]
    out = _table(["flag", "meaning", "triggered by"], rows, "qc") if rows else "<p class='ok'>no QC flag</p>"
    cut = ", ".join(qc.get("truncated") or [])
    return out + (f"<p>Cut by the field of view (their heights and areas are n/a): {_e(cut)}</p>" if cut else "")


def _measures_html(rec: Any, order: Mapping[str, int]) -> str:
    """Per-level measurements: one row per level and structure, one column per measure
    (``order``: level name -> rank, top to bottom)."""
    measures = sorted({m for _, _, m, _ in rec.values})
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for level, structure, measure, v in rec.values:
        rows.setdefault((level, structure), {})[measure] = v
    keys = sorted(rows, key=lambda k: (order.get(k[0], 999), k[1]))
    body = [[_e(lv), _e(st), *[_num(rows[(lv, st)].get(m)) if m in rows[(lv, st)] else "" for m in measures]]
            for lv, st in keys]
    return "<div class='measures'>" + _table(["level", "structure", *measures], body, "measures") + "</div>"


def _provenance_html(sem_meta: Mapping[str, Any], inst_meta: Mapping[str, Any]) -> str:
    models = {**dict(sem_meta.get("Models") or {}), **dict(inst_meta.get("Models") or {})}
    rows = []
    for role, m in models.items():
        low = {str(k).lower(): v for k, v in m.items()} if isinstance(m, dict) else {}
        engine = low.get("engine")
        rows.append([_e(role), _e(low.get("name")), _e(low.get("version")), f"<code>{_e(low.get('checksum'))}</code>",
                     _e(low.get("precision")), _e(engine.get("engine", "onnxruntime") if isinstance(engine, dict)
                                                  else engine)])
    timings = {**dict(sem_meta.get("Timings") or {}), **dict(inst_meta.get("Timings") or {})}
    trow = [[_e(k), _num(v, 3)] for k, v in timings.items()]
    params = dict(sem_meta.get("Parameters") or {})
    return (_table(["role", "model", "version", "checksum", "precision", "engine"], rows, "models")
            + "<details><summary>Full model provenance (JSON)</summary><pre>" + _e(json.dumps(models, indent=1))
            + "</pre></details>"
            + f"<p>Software: spineps {_e(sem_meta.get('SoftwareVersion'))} &middot; parameters: "
            + _e(", ".join(f"{k}={v}" for k, v in params.items() if k not in _RUN_KEYS))
            + f"<span data-volatile='run'>{_e(''.join(f', {k}={params[k]}' for k in _RUN_KEYS if k in params))}"
            + "</span></p><h3>Timings (s)</h3>"
            + f"<div data-volatile='timings'>{_table(['step', 'seconds'], trow, 'timings')}</div>")


#: the page's only script: counts errors and marks the page ready once the figure is decoded
#: (what the headless-browser test reads); the page is complete without it
_SCRIPT = """<script>
window.__spinepsErrors = [];
window.onerror = function (msg, src, line, col) {
  window.__spinepsErrors.push(String(msg) + " @" + line + ":" + col);
  document.body.setAttribute("data-errors", String(window.__spinepsErrors.length));
  return false;
};
window.addEventListener("load", function () {
  var img = document.querySelector(".fig img");
  document.body.setAttribute("data-figure-width", img ? String(img.naturalWidth) : "none");
  document.body.setAttribute("data-ready", "1");
});
</script>
"""


def render_scan_page(out: Path, rec: Any, *, css: str, software: str, level_order: Mapping[str, int]) -> str:
    """The page of one scan (``rec``: a ``spineps.group.report.ScanRecord``), a string."""
    sem_meta, inst_meta = _sidecar(rec.semantic_path), _sidecar(rec.instance_path)
    naming = dict(inst_meta.get("LevelNaming") or rec.naming or {})
    back = f"../{_REPORT}#scan={rec.bids_name}"
    sections = [
        ("Overlay figure", f"<div class='fig'>{_figure(out, rec)}</div>"),
        ("Level names and naming evidence", _naming_html(naming)),
        ("QC flags", _qc_html(rec)),
        ("Per-level measurements" + (" (measured by the group level from the masks)" if rec.source == "masks"
                                     else ""), _measures_html(rec, level_order)),
        ("Models and timings", _provenance_html(sem_meta, inst_meta)),
    ]
    body = "\n".join(f"<section><h2>{_e(t)}</h2>\n{h}\n</section>" for t, h in sections)
    return (f"<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
            f"<meta name='generator' content='spineps scan page'>\n<title>{_e(rec.bids_name)}</title>\n"
            f"<style>\n{css}\n</style>\n</head>\n<body class='scan-page' data-ready='0' data-errors='0'>\n{_SCRIPT}"
            f"<header class='top'><h1 id='scan-title'>{_e(rec.bids_name)}</h1><div class='sub'>"
            f"sub-{_e(rec.subject)}{' &middot; ses-' + _e(rec.session) if rec.session else ''} &middot; "
            f"{_e(software)}</div><nav><a href='{_e(back)}'>back to the group report</a></nav></header>\n"
            f"<main>\n{body}\n</main>\n<footer>Generated by {_e(software)} from the participant outputs of this "
            f"scan only; opens from disk, nothing is loaded from anywhere.</footer>\n</body>\n</html>\n")


def write_scan_pages(out: Path, records: Sequence[Any], *, software: str, css: str,
                     level_order: Mapping[str, int]) -> dict[str, str]:
    """Every scan's page (atomic writes); returns bids name -> page path relative to ``out``."""
    from spineps.fsutil import write_text_atomic

    pages: dict[str, str] = {}
    for rec in records:
        rel = page_path(rec.bids_name)
        write_text_atomic(out / rel, render_scan_page(out, rec, css=css, software=software, level_order=level_order))
        pages[rec.bids_name] = rel
    return pages
