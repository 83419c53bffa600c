"""The figures tables of docs/benchmarks.md against the benchmark records they are rendered from (docs/figures/).

Host-free: tools/render_figures.py reads JSON and Markdown only. A table edited by hand, or a record changed
without re-rendering the page (`python3 tools/render_figures.py`), fails here.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import sys

import pytest

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES_DIR = os.path.join(PACK_DIR, "docs", "figures")
RATIO_KEYS = {"label", "value", "target", "compare", "detail", "note"}


@pytest.fixture(scope="module")
def render():
    """tools/render_figures.py as a module (loaded from its file: the pack root never goes on sys.path)."""
    spec = importlib.util.spec_from_file_location("perres_render_figures",
                                                  os.path.join(PACK_DIR, "tools", "render_figures.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def page() -> str:
    with open(os.path.join(PACK_DIR, "docs", "benchmarks.md"), encoding="utf-8") as handle:
        return handle.read()


RECORDS = sorted(glob.glob(os.path.join(FIGURES_DIR, "**", "*.json"), recursive=True))


@pytest.mark.parametrize("path", RECORDS, ids=[os.path.relpath(p, FIGURES_DIR) for p in RECORDS])
def test_every_record_names_its_host_settings_date_and_each_ratio_against_its_target(path):
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    assert record["schema"] == "perres-benchmark/1"
    assert record["source"] == "measured" or record["source"].startswith("earlier run, transcribed from the docs")
    assert record["date"] and record["benchmark"].startswith("bench_")
    assert {"comfyui", "torch", "device"} <= set(record["host"]) and record["host"]["comfyui"]
    assert isinstance(record["settings"], dict)
    if os.path.relpath(path, FIGURES_DIR).startswith("policy"):  # the mask-policy experiment: figures, no targets
        assert record["figures"]["policy"]
    else:
        assert record["ratios"]
    for key, ratio in record["ratios"].items():
        assert RATIO_KEYS <= set(ratio), key
        assert ratio["compare"] in ("<=", "<", ">="), key
        assert isinstance(ratio["target"], (int, float)), key
        assert isinstance(ratio["value"], (int, float)) or (ratio["value"] is None and ratio["note"]), key


def test_every_table_of_the_page_agrees_with_its_records(render):
    text = page()
    assert set(render.tables_in(text)) == set(render.TABLES), "a table without markers, or markers without a table"
    assert render.render(text) == text, "docs/benchmarks.md is out of date: run python3 tools/render_figures.py"


@pytest.mark.parametrize("folder", ["sd15-cpu", "policy"])
def test_a_changed_record_makes_its_table_disagree(render, tmp_path, monkeypatch, folder):
    """The check is not vacuous: one figure changed in a copy of the records changes the rendered page."""
    copy = tmp_path / "figures"
    shutil.copytree(FIGURES_DIR, copy)
    path = sorted(copy.glob(f"{folder}/*.json"))[0]
    record = json.loads(path.read_text(encoding="utf-8"))
    if folder == "policy":
        figures = record["figures"]["policy"]
        key = next(key for key, value in figures.items() if isinstance(value, float))
        figures[key] += 0.5
    else:
        ratio = next(r for r in record["ratios"].values() if r["value"] is not None)
        ratio["value"] += 0.5
    path.write_text(json.dumps(record), encoding="utf-8")
    monkeypatch.setattr(render, "FIGURES_DIR", str(copy))
    assert render.render(page()) != page()
