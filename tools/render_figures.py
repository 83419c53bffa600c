"""Render the figures tables of docs/benchmarks.md from the benchmark records in docs/figures/.

    python3 tools/render_figures.py            # rewrite every table between its markers
    python3 tools/render_figures.py --check    # exit 1 and name the tables that differ from their records

Each benchmark writes one record per run (benchmarks/harness.py, Record; docs/figures/README.md describes the
JSON). A table stands in the page between `<!-- figures: NAME -->` and `<!-- /figures -->`; TABLES says which
records it shows and how. tests/test_benchmark_figures.py fails when a table and its records disagree.
Standard library only: no host, no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import re
import sys
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES_DIR = os.path.join(ROOT, "docs", "figures")
PAGE = os.path.join(ROOT, "docs", "benchmarks.md")
MARKER = re.compile(r"(<!-- figures: (?P<name>[\w-]+) -->\n)(?P<table>.*?)(<!-- /figures -->)", re.S)
SYMBOLS = {"<=": "≤", ">=": "≥", "<": "<"}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "anima": "Anima", "krea2": "Krea 2"}
ORDER = ("bench_training", "bench_paper_scale", "bench_lag", "bench_lag_lora", "bench_suggest", "bench_preview")

log = logging.getLogger("perres.render_figures")


def load_record(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    record["file"] = os.path.relpath(path, FIGURES_DIR)
    return record


def records(pattern: str) -> list[dict]:
    """The records matching `pattern` under docs/figures, in file-name order (dates first in the names)."""
    return [load_record(path) for path in sorted(glob.glob(os.path.join(FIGURES_DIR, pattern)))]


def provenance(record: dict) -> str:
    """When a record was measured, and whether in this page's run or transcribed from an earlier page."""
    earlier = record["source"] != "measured"
    date = f"{record['date_note']} {record['date']}" if record.get("date_note") else record["date"]
    return f"{date}{', earlier run' if earlier else ''}"


def host_column(record: dict) -> str:
    return f"ComfyUI {record['host']['comfyui']} ({provenance(record)})"


def family_column(record: dict) -> str:
    family = record["settings"].get("family", "sd15")
    blocks = record["settings"].get("krea2_blocks")
    name = FAMILY_NAMES[family] + (f" ({blocks} blocks)" if family == "krea2" and blocks else "")
    return f"{name} ({provenance(record)})"


@dataclasses.dataclass(frozen=True)
class Table:
    """Which records a table shows (a glob under docs/figures) and how: "ratios" has a row per ratio and a column
    per `column(record)` (one column: a row per ratio of each record); "trainers" is bench_paper_scale's three
    trainers of one record; "policy" has a row per figure of bench_lag_lora's mask-policy experiment and a column
    per `column(record)`."""
    pattern: str
    kind: str = "ratios"
    column: Optional[Callable[[dict], str]] = None
    title: str = ""


TABLES = {
    "sd15-cpu": Table("sd15-cpu/*.json", column=host_column),
    "dit-cpu": Table("dit-cpu/*.json", column=family_column),
    "larger-settings": Table("larger-settings/*.json"),
    "paper-scale-512": Table("larger-settings/*bench_paper_scale_512.json", kind="trainers",
                             title="512 px, batch 4, fp32, CPU"),
    "paper-scale-sdxl": Table("hardware/*bench_paper_scale_sdxl_256.json", kind="trainers",
                              title="SDXL, 256 px, batch 1, bf16, CPU"),
    "mask-policy": Table("policy/*.json", kind="policy", column=family_column),
}


def number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def target_text(ratio: dict) -> str:
    target = ratio["target"]
    shown = str(int(target)) if float(target).is_integer() else f"{target:.2f}"
    return f"{SYMBOLS[ratio['compare']]} {shown}"


def cell(ratio: Optional[dict]) -> str:
    if ratio is None:
        return "—"
    if ratio["value"] is None:
        return ratio["note"]
    text = number(ratio["value"], ratio.get("digits", 3))
    return f"{text} {ratio['detail']}" if ratio.get("detail") else text


def row_label(ratio: dict, notes: list[str], benchmark: str, first: bool) -> str:
    if not first:
        return f"{ratio['label']} (same run)"
    return f"{ratio['label']} (`{benchmark}`{', ' + '; '.join(notes) if notes else ''})"


def ratio_table(table: Table, found: list[dict]) -> list[str]:
    if table.column is None:  # one column: every ratio of every record, labelled with its record's settings
        lines = ["| ratio (settings, host) | target | measured |", "|---|---|---|"]
        for record in found:
            for ratio in record["ratios"].values():
                where = f"{record['note']}, ComfyUI {record['host']['comfyui']}, {provenance(record)}"
                lines.append(f"| {ratio['label']} ({where}) | {target_text(ratio)} | {cell(ratio)} |")
        return lines
    columns: dict[str, dict[str, dict]] = {}  # column -> benchmark -> record
    rows: dict[str, dict[str, dict]] = {}     # benchmark -> ratio key -> the first ratio seen (label, target)
    for record in found:
        benchmark = record["benchmark"].split("-")[0]  # bench_training-anima is bench_training's row
        columns.setdefault(table.column(record), {})[benchmark] = record
        for key, ratio in record["ratios"].items():
            rows.setdefault(benchmark, {}).setdefault(key, ratio)
    lines = ["| ratio (settings) | target | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for benchmark in sorted(rows, key=lambda name: ORDER.index(name) if name in ORDER else len(ORDER)):
        ratios = rows[benchmark]
        # the settings are the script's: the first record's note, or each family's where they differ
        notes = {column.split(" (")[0]: by[benchmark]["note"] for column, by in columns.items() if benchmark in by}
        settings = next(iter(notes.values()))
        if table.column is family_column and len(set(notes.values())) > 1:
            settings = ", ".join(note if note.startswith(column) else f"{column} {note}"
                                 for column, note in notes.items())
        for index, (key, ratio) in enumerate(ratios.items()):
            label = f"{ratio['label']} (`{benchmark}`, {settings})" if index == 0 else f"{ratio['label']} (same run)"
            cells = [cell(by[benchmark]["ratios"].get(key) if benchmark in by else None) for by in columns.values()]
            lines.append(f"| {label} | {target_text(ratio)} | " + " | ".join(cells) + " |")
    return lines


def trainers_table(table: Table, found: list[dict]) -> list[str]:
    if len(found) != 1:
        raise SystemExit(f"table {table.pattern}: one record expected, found {len(found)}")
    record = found[0]
    trainers, ratios = record["figures"]["trainers"], record["ratios"]

    def times(key: str) -> str:
        return number(ratios[key]["value"], ratios[key].get("digits", 3))

    def step(name: str) -> str:
        return number(trainers[name]["seconds_per_step"], 2)

    def memory(name: str) -> str:
        return f"{number(trainers[name]['extra_peak_gib'], 2)} GiB"

    title = f"{table.title} (ComfyUI {record['host']['comfyui']}, {provenance(record)})"
    return [f"| {title} | s/step | memory above the loaded model |", "|---|---|---|",
            f"| frozen-UNet forward + backward (the bound) | {step('bound')} | {memory('bound')} |",
            f"| PerRes, `gradient_checkpointing` off | {step('plain')} ({times('plain/bound')}× the bound) | "
            f"{memory('plain')} |",
            f"| PerRes, `gradient_checkpointing` on (default) | {step('ckpt')} ({times('ckpt/plain')}× off) | "
            f"**{memory('ckpt')} ({times('extra peak plain/ckpt')}× less)** |"]


def policy_table(table: Table, found: list[dict]) -> list[str]:
    """Agreement shares (and kept / leak fractions) of the mask-policy experiment, a column per record."""
    found = sorted(found, key=lambda record: list(FAMILY_NAMES).index(record["settings"].get("family", "sd15")))
    columns = {table.column(record): record["figures"]["policy"] for record in found}
    rows = list(dict.fromkeys(row for figures in columns.values() for row in figures))

    def shown(value) -> str:
        values = value if isinstance(value, list) else [value]
        return "—" if None in values else " / ".join(number(v, 3) for v in values)
    settings = ", ".join(dict.fromkeys(f"{record['settings']['policy_resolution']} px, "
                                       f"{record['settings']['policy_steps']} steps" for record in found))
    lines = [f"| mask policy ({settings}) | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    return lines + [f"| {row} | " + " | ".join(shown(figures.get(row)) for figures in columns.values()) + " |"
                    for row in rows]


def render_table(name: str) -> str:
    table = TABLES[name]
    found = records(table.pattern)
    if not found:
        raise SystemExit(f"table {name}: no record matches docs/figures/{table.pattern}")
    kinds = {"trainers": trainers_table, "policy": policy_table, "ratios": ratio_table}
    lines = kinds[table.kind](table, found)
    return "\n".join(lines) + "\n"


def render(page: str) -> str:
    """The page with every table between its markers rendered from its records."""
    def replace(match: re.Match) -> str:
        if match.group("name") not in TABLES:
            raise SystemExit(f"docs/benchmarks.md names an unknown table {match.group('name')!r}")
        return match.group(1) + render_table(match.group("name")) + match.group(4)
    return MARKER.sub(replace, page)


def tables_in(page: str) -> dict[str, str]:
    return {match.group("name"): match.group("table") for match in MARKER.finditer(page)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is out of date")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with open(PAGE, encoding="utf-8") as handle:
        page = handle.read()
    rendered = render(page)
    stale = [name for name, text in tables_in(rendered).items() if tables_in(page).get(name) != text]
    if opts.check:
        for name in stale:
            log.error("docs/benchmarks.md: table %s differs from docs/figures/%s", name, TABLES[name].pattern)
        return 1 if stale else 0
    if stale:
        with open(PAGE, "w", encoding="utf-8") as handle:
            handle.write(rendered)
    log.info("docs/benchmarks.md: %s", f"rewrote {', '.join(stale)}" if stale else "every table up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
