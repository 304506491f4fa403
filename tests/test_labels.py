"""The label registry: values, names, lookup tables, and that it imports without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spineps import labels as L


def test_semantic_values_match_the_community_convention():
    values = {lab.value for lab in L.SEMANTIC}
    assert values == {41, 42, 43, 44, 45, 46, 47, 48, 49, 52, 53, 60, 61, 62, 100, 26}
    assert len({lab.abbreviation for lab in L.SEMANTIC}) == len(L.SEMANTIC)
    assert all(lab.color.startswith("#") and len(lab.color) == 7 for lab in L.SEMANTIC)


@pytest.mark.parametrize("value,name", [(1, "C1"), (2, "C2"), (7, "C7"), (8, "T1"), (19, "T12"), (20, "L1"),
                                        (24, "L5"), (25, "L6"), (26, "S1"), (28, "T13")])
def test_vertebra_names_round_trip(value, name):
    assert L.vertebra_name(value) == name
    assert L.vertebra_value(name) == value
    assert L.vertebra_value(name.lower()) == value


def test_anatomical_order_and_next():
    order = L.VERTEBRA_ORDER
    assert order.index(19) < order.index(28) < order.index(20)
    assert order.index(24) < order.index(25) < order.index(26)
    assert L.next_vertebra(7) == 8 and L.next_vertebra(19) == 20 and L.next_vertebra(24) == 26
    assert L.next_vertebra(26) is None


def test_disc_and_endplate_names():
    assert L.disc_value(19) == 119 and L.endplate_value(24) == 224
    assert L.instance_name(119) == "T12/L1 disc"
    assert L.instance_name(124) == "L5/S1 disc"
    assert L.instance_name(202) == "C2/C3 endplate"
    with pytest.raises(KeyError):
        L.instance_name(99)
    with pytest.raises(KeyError):
        L.instance_name(127)


def test_instance_lookup_table_is_unique_and_complete():
    labs = L.instance_labels()
    values = [lab.value for lab in labs]
    assert len(values) == len(set(values))
    assert set(range(1, 29)) - {27} <= set(values)
    assert {124, 125, 128, 224} <= set(values)
    assert 126 not in values  # nothing below the sacrum


@pytest.mark.parametrize("token,value", [(49, 49), ("49", 49), ("Vertebra_Corpus", 49), ("vertebral body", 49),
                                         ("IVD", 100), ("spinal canal", 61), ("L1", 20), ("background", 0),
                                         ("costal process left", 43)])
def test_resolve_label(token, value):
    assert L.resolve_label(token) == value


@pytest.mark.parametrize("token", ["nonsense", True, None, 1.5])
def test_resolve_label_rejects_unknown(token):
    with pytest.raises(KeyError):
        L.resolve_label(token)


def test_registry_imports_without_heavy_modules():
    code = "import sys, spineps.labels; bad = {'torch', 'numpy', 'nnunetv2'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
