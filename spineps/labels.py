"""The label registry: every label value the app reads or writes, as plain data.

Imports nothing heavy (no numpy, no torch), so the CLI parser, the group report and any
downstream script can use it cheaply.

Semantic values follow the community convention of the published SPINEPS method
(`shared/spec/spineps-method.md`, section 2). Instance values: vertebrae 1..28
(C1..C7 = 1..7, T1..T12 = 8..19, L1..L5 = 20..24, L6 = 25, S1/sacrum = 26, T13 = 28),
the disc below vertebra X = 100 + X, endplates next to that disc = 200 + X.

``mapping`` is the standard BIDS "common image-derived label" of each structure
(0 background, 2 white matter, 3 CSF, 4 bone, 5 soft tissue), or ``None`` where no
standard label fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = [
    "Label",
    "LEVEL_RULES",
    "SEMANTIC",
    "SEMANTIC_BY_VALUE",
    "VERTEBRA_PARTS",
    "INSTANCE_PARTS",
    "ENDPLATES",
    "BODY",
    "ARCUS",
    "SPINOUS",
    "COSTAL_L",
    "COSTAL_R",
    "SUP_ART_L",
    "SUP_ART_R",
    "INF_ART_L",
    "INF_ART_R",
    "ENDPLATE",
    "ENDPLATE_SUP",
    "ENDPLATE_INF",
    "CORD",
    "CANAL",
    "DISC",
    "SACRUM",
    "VERTEBRA_VALUES",
    "VERTEBRA_ORDER",
    "vertebra_name",
    "vertebra_value",
    "disc_value",
    "endplate_value",
    "instance_name",
    "instance_labels",
    "next_vertebra",
    "region_of",
    "resolve_label",
    "DEFAULT_INSTANCE_MAPPING",
]


@dataclass(frozen=True)
class Label:
    """One label value with its human and BIDS names."""

    value: int
    name: str
    abbreviation: str
    color: str  # "#rrggbb"
    mapping: Optional[int]  # standard BIDS label, None when none fits
    aliases: tuple[str, ...] = ()


# --- semantic ("spine") mask -------------------------------------------------------
ARCUS = 41
SPINOUS = 42
COSTAL_L = 43
COSTAL_R = 44
SUP_ART_L = 45
SUP_ART_R = 46
INF_ART_L = 47
INF_ART_R = 48
BODY = 49
ENDPLATE_SUP = 52
ENDPLATE_INF = 53
CORD = 60
CANAL = 61
ENDPLATE = 62
DISC = 100
SACRUM = 26

SEMANTIC: tuple[Label, ...] = (
    Label(ARCUS, "arcus vertebrae", "ARC", "#e6194b", 4, ("arcus", "arcus_vertebrae", "vertebra_arcus")),
    Label(SPINOUS, "spinous process", "SP", "#f58231", 4, ("spinosus_process", "spinous_process", "spinosus")),
    Label(COSTAL_L, "costal process left", "CPL", "#ffe119", 4, ("costal_process_left", "transverse_process_left")),
    Label(COSTAL_R, "costal process right", "CPR", "#bfef45", 4, ("costal_process_right", "transverse_process_right")),
    Label(SUP_ART_L, "superior articular process left", "SAPL", "#3cb44b", 4,
          ("superior_articular_left", "superior_articular_process_left")),
    Label(SUP_ART_R, "superior articular process right", "SAPR", "#42d4f4", 4,
          ("superior_articular_right", "superior_articular_process_right")),
    Label(INF_ART_L, "inferior articular process left", "IAPL", "#4363d8", 4,
          ("inferior_articular_left", "inferior_articular_process_left")),
    Label(INF_ART_R, "inferior articular process right", "IAPR", "#911eb4", 4,
          ("inferior_articular_right", "inferior_articular_process_right")),
    Label(BODY, "vertebral body", "VB", "#f032e6", 4, ("vertebra_corpus", "corpus", "vertebra_body", "body")),
    Label(ENDPLATE_SUP, "superior endplate", "EPS", "#fabed4", 4, ("endplate_superior",)),
    Label(ENDPLATE_INF, "inferior endplate", "EPI", "#dcbeff", 4, ("endplate_inferior",)),
    Label(CORD, "spinal cord", "SC", "#fffac8", None, ("spinal_cord", "cord")),
    Label(CANAL, "spinal canal", "CAN", "#469990", 3, ("spinal_canal", "canal", "csf")),
    Label(ENDPLATE, "vertebral endplate", "EP", "#aaffc3", 4, ("endplate", "vertebra_endplate")),
    Label(DISC, "intervertebral disc", "IVD", "#000075", 5, ("vertebra_disc", "disc", "ivd")),
    Label(SACRUM, "sacrum", "SAC", "#9a6324", 4, ("s1",)),
)
SEMANTIC_BY_VALUE: dict[int, Label] = {lab.value: lab for lab in SEMANTIC}

#: the ten vertebra substructures of the semantic phase (endplate included, 52/53 too)
VERTEBRA_PARTS: frozenset[int] = frozenset(
    {ARCUS, SPINOUS, COSTAL_L, COSTAL_R, SUP_ART_L, SUP_ART_R, INF_ART_L, INF_ART_R, BODY, ENDPLATE,
     ENDPLATE_SUP, ENDPLATE_INF}
)
#: the nine substructures a vertebra instance covers (41..49; its endplates take the value of
#: their disc level, 200 + X)
INSTANCE_PARTS: tuple[int, ...] = (ARCUS, SPINOUS, COSTAL_L, COSTAL_R, SUP_ART_L, SUP_ART_R, INF_ART_L, INF_ART_R,
                                   BODY)
#: endplate values: after the superior/inferior split (52/53) and as predicted (62)
ENDPLATES: tuple[int, ...] = (ENDPLATE_SUP, ENDPLATE_INF, ENDPLATE)

# --- instance ("vertebrae") mask -----------------------------------------------------
_VERTEBRA_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{7 + i: f"T{i}" for i in range(1, 13)},
    **{19 + i: f"L{i}" for i in range(1, 6)},
    25: "L6",
    26: "S1",
    28: "T13",
}
VERTEBRA_VALUES: frozenset[int] = frozenset(_VERTEBRA_NAMES)
#: vertebra values in anatomical order, top to bottom (T13 after T12, L6 after L5)
VERTEBRA_ORDER: tuple[int, ...] = (*range(1, 20), 28, *range(20, 25), 25, 26)
_STANDARD_NEXT = {7: 8, 19: 20, 24: 26, 25: 26, 28: 20}


#: level-naming rules (``spineps.labeling.levels``); "auto" combines the cues
LEVEL_RULES: tuple[str, ...] = ("auto", "sacrum", "c2", "ribs", "size", "count-from-top", "count-from-bottom")


def vertebra_name(value: int) -> str:
    """``20 -> 'L1'``; raises ``KeyError`` for a value that is no vertebra."""
    return _VERTEBRA_NAMES[value]


def vertebra_value(name: str) -> int:
    """``'L1' -> 20`` (case-insensitive; 'sacrum' -> 26)."""
    key = name.strip().upper()
    if key in ("SACRUM", "S"):
        return 26
    for value, vname in _VERTEBRA_NAMES.items():
        if vname == key:
            return value
    raise KeyError(name)


def next_vertebra(value: int) -> Optional[int]:
    """The vertebra below ``value`` in a standard spine (C7 -> T1, T12 -> L1, L5 -> S1)."""
    if value == 26:
        return None
    return _STANDARD_NEXT.get(value, value + 1)


def disc_value(vertebra: int) -> int:
    """Instance value of the disc below ``vertebra``."""
    return 100 + vertebra


def endplate_value(vertebra: int) -> int:
    """Instance value of the endplates next to the disc below ``vertebra``."""
    return 200 + vertebra


def instance_name(value: int) -> str:
    """Readable name of any instance value: 'L1', 'L1/L2 disc', 'L1/L2 endplate'."""
    if value in _VERTEBRA_NAMES:
        return _VERTEBRA_NAMES[value]
    base, kind = (value - 100, "disc") if 100 < value < 200 else (value - 200, "endplate")
    if base not in _VERTEBRA_NAMES or value >= 300:
        raise KeyError(value)
    below = next_vertebra(base)
    below_name = _VERTEBRA_NAMES[below] if below is not None else "?"
    return f"{_VERTEBRA_NAMES[base]}/{below_name} {kind}"


def region_of(value: int) -> str:
    """'cervical', 'thoracic', 'lumbar' or 'sacral' for a vertebra value."""
    name = _VERTEBRA_NAMES[value]
    return {"C": "cervical", "T": "thoracic", "L": "lumbar", "S": "sacral"}[name[0]]


def _instance_color(value: int) -> str:
    # a stable, well-spread hue per value (golden-angle walk), no randomness
    import colorsys

    hue = (value * 0.618033988749895) % 1.0
    light = 0.55 if value < 100 else (0.35 if value < 200 else 0.75)
    r, g, b = colorsys.hls_to_rgb(hue, light, 0.75)
    return "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))


def instance_labels() -> tuple[Label, ...]:
    """Every value the instance mask may hold, with names, abbreviations and colours."""
    out: list[Label] = []
    for v in VERTEBRA_ORDER:
        out.append(Label(v, _VERTEBRA_NAMES[v], _VERTEBRA_NAMES[v], _instance_color(v), 4))
    for v in VERTEBRA_ORDER:
        if v == 26:
            continue
        out.append(Label(100 + v, instance_name(100 + v), f"IVD{_VERTEBRA_NAMES[v]}", _instance_color(100 + v), 5))
    for v in VERTEBRA_ORDER:
        if v == 26:
            continue
        out.append(Label(200 + v, instance_name(200 + v), f"EP{_VERTEBRA_NAMES[v]}", _instance_color(200 + v), 4))
    return tuple(out)


def resolve_label(token: object) -> int:
    """Turn a label given as int, numeric string, registry name, alias, abbreviation or
    vertebra name into its value. Raises ``KeyError`` when unknown."""
    if isinstance(token, bool):
        raise KeyError(token)
    if isinstance(token, int):
        return token
    if isinstance(token, float) and token.is_integer():
        return int(token)
    if not isinstance(token, str):
        raise KeyError(token)
    text = token.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    key = text.lower().replace(" ", "_").replace("-", "_")
    if key in ("background", "bg", "none", "zero"):
        return 0
    for lab in SEMANTIC:
        names = {lab.name.replace(" ", "_"), lab.abbreviation.lower(), *lab.aliases}
        if key in names:
            return lab.value
    return vertebra_value(text)


#: semantic value -> instance-network input channel (spec section 3 default ``mapping``)
DEFAULT_INSTANCE_MAPPING: dict[int, int] = {
    **{v: v - 40 for v in INSTANCE_PARTS},
    50: 9,
    51: 9,
    26: 0,
}
