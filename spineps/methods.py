"""The methods boilerplate of a participant run: a Markdown paragraph a paper can paste, and
the BibTeX of its references, written under ``logs/`` of the output dataset (listed in
``.bidsignore``) as ``<run id>_methods.md`` / ``.bib`` and ``methods.json`` (the facts the
text was made from). The group report shows the distinct texts of the runs behind it in its
"About / Methods" section (:func:`collect_methods`).

The text names what the run really did: the software version, each model's name, version
and checksum and whether it is a bundled demonstration model, N4 and the resampling onto the
model grid, precision and engine, the post-processing, the level-naming rule, and cites the
method, nnU-Net, N4 and BIDS.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:  # pragma: no cover
    from spineps.settings import Settings

__all__ = ["REFERENCES", "methods_facts", "methods_markdown", "methods_bibtex", "write_methods", "collect_methods",
           "markdown_to_html", "METHODS_SUFFIX"]

log = logging.getLogger(__name__)

METHODS_SUFFIX = "_methods.md"

#: BibTeX key -> entry (the references the text cites)
REFERENCES: dict[str, str] = {
    "moeller2024spineps": (
        "@article{moeller2024spineps,\n"
        "  author = {M{\\\"o}ller, Hendrik and Graf, Robert and Schmitt, Joachim and Keinert, Benjamin and "
        "Sch{\\\"o}n, Hanna and Atad, Matan and Sekuboyina, Anjany and Streckenbach, Felix and Kofler, Florian and "
        "Kroencke, Thomas and Bette, Stefanie and Willich, Stefan N. and Keil, Thomas and Niendorf, Thoralf and "
        "Pischon, Tobias and Endemann, Beate and Menze, Bjoern and Rueckert, Daniel and Kirschke, Jan S.},\n"
        "  title = {{SPINEPS} -- automatic whole spine segmentation of {T2}-weighted {MR} images using a "
        "two-phase approach to multi-class semantic and instance segmentation},\n"
        "  journal = {European Radiology},\n  year = {2024},\n  doi = {10.1007/s00330-024-11155-y}\n}"),
    "isensee2021nnunet": (
        "@article{isensee2021nnunet,\n"
        "  author = {Isensee, Fabian and Jaeger, Paul F. and Kohl, Simon A. A. and Petersen, Jens and "
        "Maier-Hein, Klaus H.},\n"
        "  title = {{nnU-Net}: a self-configuring method for deep learning-based biomedical image segmentation},\n"
        "  journal = {Nature Methods},\n  volume = {18},\n  pages = {203--211},\n  year = {2021},\n"
        "  doi = {10.1038/s41592-020-01008-z}\n}"),
    "tustison2010n4": (
        "@article{tustison2010n4,\n"
        "  author = {Tustison, Nicholas J. and Avants, Brian B. and Cook, Philip A. and Zheng, Yuanjie and "
        "Egan, Alexander and Yushkevich, Paul A. and Gee, James C.},\n"
        "  title = {{N4ITK}: improved {N3} bias correction},\n"
        "  journal = {IEEE Transactions on Medical Imaging},\n  volume = {29},\n  number = {6},\n"
        "  pages = {1310--1320},\n  year = {2010},\n  doi = {10.1109/TMI.2010.2046908}\n}"),
    "gorgolewski2016bids": (
        "@article{gorgolewski2016bids,\n"
        "  author = {Gorgolewski, Krzysztof J. and others},\n"
        "  title = {The brain imaging data structure, a format for organizing and describing outputs of "
        "neuroimaging experiments},\n"
        "  journal = {Scientific Data},\n  volume = {3},\n  pages = {160044},\n  year = {2016},\n"
        "  doi = {10.1038/sdata.2016.44}\n}"),
    "gorgolewski2017bidsapps": (
        "@article{gorgolewski2017bidsapps,\n"
        "  author = {Gorgolewski, Krzysztof J. and others},\n"
        "  title = {{BIDS} apps: improving ease of use, accessibility, and reproducibility of neuroimaging data "
        "analysis methods},\n"
        "  journal = {PLoS Computational Biology},\n  volume = {13},\n  number = {3},\n  pages = {e1005209},\n"
        "  year = {2017},\n  doi = {10.1371/journal.pcbi.1005209}\n}"),
}

#: what each --level-rule does, in a sentence of the text
_RULE_TEXT: dict[str, str] = {
    "auto": "combining every cue available in the image (the sacrum below the last lumbar vertebra, the shape "
            "of C2 at the top, costal-process cues and vertebral-body sizes), the strongest cue in view deciding",
    "sacrum": "counting upwards from the sacrum (the vertebra above it is L5, or L6 with a lumbosacral "
              "transitional vertebra)",
    "c2": "counting downwards from C2, recognised by its shape",
    "ribs": "from costal-process cues (the last rib-bearing vertebra is the last thoracic one)",
    "size": "from the vertebral-body sizes along the column",
    "count-from-top": "counting downwards with the top-most vertebra in view taken as C2",
    "count-from-bottom": "counting upwards with the bottom-most vertebra in view taken as L5",
}


def _model_facts(role: str, prov: Mapping[str, Any], source: str) -> dict[str, Any]:
    return {
        "role": role, "name": str(prov.get("name", "unknown")), "version": str(prov.get("version", "unversioned")),
        "checksum": str(prov.get("checksum", "n/a")), "source": source,
        "demonstration": source == "bundled",
        "precision": prov.get("precision"), "engine": _engine_name(prov.get("engine")),
        "mirroring": prov.get("mirroring"), "spacing": prov.get("spacing"), "orientation": prov.get("orientation"),
        "folds": prov.get("folds"), "configuration": prov.get("configuration"),
    }


def _engine_name(engine: Any) -> Optional[str]:
    if isinstance(engine, Mapping):
        return str(engine.get("engine") or engine.get("name") or "onnxruntime")
    return None if engine is None else str(engine)


def methods_facts(settings: "Settings", models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The facts the text is made from (also saved as JSON): ``models`` maps ``semantic`` /
    ``instance`` to a model provenance (``participant.model_provenance``)."""
    sources = {"semantic": settings.semantic_model_source, "instance": settings.instance_model_source}
    return {
        "software": "spineps", "version": settings.version or "unknown",
        "input": settings.input_kind, "n4": bool(settings.n4), "device": settings.device,
        "precision_option": settings.precision, "engine_option": settings.engine,
        "level_rule": settings.level_rule, "top_vertebra": settings.top_vertebra,
        "tta": bool(getattr(settings, "tta", False)),
        "models": [_model_facts(role, prov, sources.get(role, "unknown")) for role, prov in models.items()],
    }


def _model_sentence(m: Mapping[str, Any]) -> str:
    what = {"semantic": "semantic (nnU-Net) model", "instance": "instance (cutout U-Net) model"}.get(
        m["role"], f"{m['role']} model")
    text = f"The {what} was `{m['name']}` (version {m['version']}, checksum `{m['checksum']}`)"
    if m["demonstration"]:
        text += (", the small demonstration model bundled with spineps (trained for this software's tests and "
                 "demo, not for studies)")
    else:
        text += f", given by the user ({'--' + m['role'] + '-model' if m['source'] == 'flag' else 'environment'})"
    run = [f"{m['precision']} precision" if m.get("precision") else "",
           f"{m['engine']} engine" if m.get("engine") else "",
           "with test-time mirroring" if m.get("mirroring") else ("without test-time mirroring"
                                                                  if m.get("mirroring") is not None else "")]
    run = [r for r in run if r]
    return text + (f"; it ran with {', '.join(run)}." if run else ".")


def _preprocessing_sentence(facts: Mapping[str, Any]) -> str:
    if facts["input"] != "image":
        return ("The semantic masks were given as input (no image was read); the instance phase ran on them "
                "directly.")
    sem: Mapping[str, Any] = next((m for m in facts["models"] if m["role"] == "semantic"), {})
    spacing = sem.get("spacing")
    grid = f" ({_spacing_text(spacing)} mm)" if spacing else ""
    orient = f", in {''.join(sem['orientation'])} orientation" if sem.get("orientation") else ""
    n4 = ("Each image was corrected for intensity inhomogeneity with N4 bias-field correction "
          "[@tustison2010n4], then" if facts["n4"] else "Each image (without bias-field correction) was")
    return (f"{n4} reoriented and resampled onto the semantic model's grid{grid}{orient} with third-order "
            "B-spline interpolation; the masks were brought back onto the image grid by nearest-neighbour "
            "resampling, so every output is on the grid of its source scan.")


def _spacing_text(spacing: Any) -> str:
    if isinstance(spacing, (list, tuple)) and spacing and isinstance(spacing[0], (list, tuple)):
        lo, hi = spacing[0], spacing[1] if len(spacing) > 1 else spacing[0]
        return " x ".join(f"{float(a):g}" if a == b else f"{float(a):g}-{float(b):g}" for a, b in zip(lo, hi))
    return " x ".join(f"{float(s):g}" for s in spacing)


def methods_markdown(facts: Mapping[str, Any]) -> str:
    """The boilerplate (Markdown, with ``[@key]`` citations of :data:`REFERENCES`)."""
    rule = facts["level_rule"]
    naming = (f"The vertebrae were named by level with the top-most vertebra in view set to {facts['top_vertebra']} "
              "by the user" if facts.get("top_vertebra") else
              f"The vertebrae were named by level (rule `{rule}`: {_RULE_TEXT.get(rule, rule)})")
    demo = any(m["demonstration"] for m in facts["models"])
    lines = [
        "# Methods (generated by spineps)", "",
        f"The spine was segmented in sagittal T2-weighted MR images with spineps {facts['version']}, an independent "
        "implementation of the two-phase SPINEPS method [@moeller2024spineps] as a BIDS-App "
        "[@gorgolewski2017bidsapps; @gorgolewski2016bids]. A semantic phase (nnU-Net [@isensee2021nnunet]) labels "
        "vertebra substructures, intervertebral discs, spinal canal, spinal cord and sacrum; an instance phase "
        "(a 3D U-Net on cutouts of the semantic mask) separates the vertebrae.",
        "", _preprocessing_sentence(facts), "",
        *[_model_sentence(m) for m in facts["models"]], "",
        "Post-processing: small disconnected components and structures far from the spine were removed and holes "
        "in the vertebral bodies, discs, canal and cord filled; the instance and semantic masks were made "
        "consistent voxel for voxel; endplates were split into upper and lower ones and each disc and endplate "
        f"took the number of the vertebra above it. {naming}; the rule used and its confidence are recorded in "
        "each scan's sidecar. Per-level measurements (vertebral-body and disc heights, canal and cord "
        "cross-sections) and quality-control flags were derived from the final masks.",
    ]
    if demo:
        lines += ["", "**Note:** bundled demonstration models were used; their results are not meant for a study."]
    lines += ["", "## References", "", *[f"- `{key}`" for key in REFERENCES], "",
              "(BibTeX in the `.bib` file beside this one.)", ""]
    return "\n".join(lines)


def methods_bibtex() -> str:
    return "\n\n".join(REFERENCES.values()) + "\n"


def write_methods(settings: "Settings", models: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``logs/<run id>_methods.md``, ``.bib`` and ``.json`` atomically; returns the
    Markdown file."""
    from spineps.fsutil import write_json_atomic, write_text_atomic

    facts = methods_facts(settings, models)
    md = settings.logs_dir / f"{settings.run_id}{METHODS_SUFFIX}"
    write_text_atomic(md, methods_markdown(facts))
    write_text_atomic(md.with_suffix(".bib"), methods_bibtex())
    write_json_atomic(md.with_suffix(".json"), facts)
    log.info("methods boilerplate: %s (+ .bib)", md)
    return md


def collect_methods(output_dir: Path) -> list[dict[str, Any]]:
    """The distinct methods texts of the participant runs in ``output_dir/logs`` (newest run
    first): ``{"markdown", "bibtex", "runs": [run ids]}``."""
    found: dict[str, dict[str, Any]] = {}
    logs = Path(output_dir) / "logs"
    paths = sorted(logs.glob(f"*{METHODS_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if logs.is_dir() else []
    for md in paths:
        try:
            text = md.read_text(encoding="utf-8")
            bib = md.with_suffix(".bib").read_text(encoding="utf-8") if md.with_suffix(".bib").is_file() else ""
        except OSError as exc:
            log.warning("%s: not read: %s", md, exc)
            continue
        entry = found.setdefault(text, {"markdown": text, "bibtex": bib, "runs": []})
        entry["runs"].append(md.name[: -len(METHODS_SUFFIX)])
    return list(found.values())



def _inline(text: str) -> str:
    import html
    import re

    out = html.escape(text, quote=True)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\[@([^\]]+)\]", lambda m: "[" + m.group(1).replace("@", "") + "]", out)


def markdown_to_html(text: str) -> str:
    """The small Markdown subset of :func:`methods_markdown` (headings, paragraphs, ``-``
    lists, code spans, bold) as escaped HTML for the group report."""
    blocks: list[str] = []
    para: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if para:
            blocks.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            flush()
        elif stripped.startswith("#"):
            flush()
            level = min(6, len(stripped) - len(stripped.lstrip("#")) + 2)
            blocks.append(f"<h{level}>{_inline(stripped.lstrip('#').strip())}</h{level}>")
        elif stripped.startswith("- "):
            if para:
                flush()
            items.append(stripped[2:])
        else:
            para.append(stripped)
    flush()
    return "\n".join(blocks)
