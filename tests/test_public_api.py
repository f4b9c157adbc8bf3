from __future__ import annotations

import importlib

import monai_sdfsmis


def test_every_public_name_resolves_to_its_subpackage_object():
    for name, sub in monai_sdfsmis._EXPORTS.items():
        module = importlib.import_module(f"monai_sdfsmis.{sub}")
        assert getattr(monai_sdfsmis, name) is getattr(module, name), name


def test_unknown_name_raises_attribute_error():
    try:
        monai_sdfsmis.NoSuchThing  # noqa: B018
    except AttributeError as err:
        assert "NoSuchThing" in str(err)
    else:
        raise AssertionError("expected AttributeError")
