"""One registry of model families: a checkpoint's model_type says how it loads as a captioner or an ITM scorer."""

from __future__ import annotations

import json

import pytest

from capfilt.errors import ConfigError
from model import registry


def test_one_table_names_every_family_of_both_kinds():
    assert registry.families("captioner") == ["blip", "blip-2", "capfilt-blip2-stage2"]
    assert registry.families("itm") == ["blip", "blip-2", "capfilt-folds", "capfilt-qformer"]


def test_capfilts_own_model_types_are_the_ones_its_models_write(tmp_path):
    from model.blip2 import MODEL_TYPE as STAGE2
    from model.folds import write_folds
    from model.qformer import MODEL_TYPE as STAGE1

    assert (registry.STAGE1_MODEL_TYPE, registry.STAGE2_MODEL_TYPE) == (STAGE1, STAGE2)
    write_folds(tmp_path, ["fold-0/filter", "fold-1/filter"])
    assert registry.model_type("itm", str(tmp_path)) == registry.FOLDS_MODEL_TYPE


def test_every_named_loader_exists():
    import importlib

    for loaders in registry.FAMILIES.values():
        for loader in loaders.values():
            module, name = loader.split(":")
            assert callable(getattr(importlib.import_module(module), name)), loader


def test_a_model_of_the_other_kind_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "capfilt-qformer"}))
    assert registry.model_type("itm", str(tmp_path)) == "capfilt-qformer"
    with pytest.raises(ConfigError, match=r"--captioner '.*': model_type 'capfilt-qformer' is not a known captioner; "
                                          r"known: blip, blip-2, capfilt-blip2-stage2\."):
        registry.model_type("captioner", str(tmp_path))


def test_a_folder_without_a_config_names_the_option_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"--itm '.*': no model config found .*`capfilt train stage1 --out`"):
        registry.model_type("itm", str(tmp_path))


def test_a_new_family_plugs_in(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "FAMILIES", {**registry.FAMILIES})
    registry.register("my-captioner", "captioner", lambda id_or_path, device: ("loaded", id_or_path, device))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my-captioner"}))
    from model.captioners import load_captioner

    assert load_captioner(str(tmp_path), device="cpu") == ("loaded", str(tmp_path), "cpu")
    with pytest.raises(ValueError, match="kind 'vqa'"):
        registry.register("my-captioner", "vqa", lambda id_or_path, device: None)
