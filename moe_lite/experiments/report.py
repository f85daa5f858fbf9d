"""Markdown results page from the JSON files that ``python -m moe_lite run`` writes.

    python -m moe_lite report results/ --out docs/results.md

Every table comes from a run's JSON, with the command that reproduces it, the size, device, data
source and wall time, so the page never holds a number that no run produced.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence

EXPERIMENT_ORDER = ("vimoe", "dynamic", "zoo", "balance", "adapt", "dit")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "n/a"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A GitHub markdown table from a list of row dicts (columns in first-seen order)."""
    if not rows:
        return "_(empty)_\n"
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def command_for(record: Dict[str, Any]) -> str:
    """The CLI line that reproduces a run."""
    seeds = record.get("config", {}).get("seeds") or [0]
    data = " --data embedded" if record.get("data_source") == "embedded subset" else ""
    seed_part = "" if list(seeds) == [0] else " --seeds " + " ".join(str(s) for s in seeds)
    return f"python -m moe_lite run {record['name']} --size {record['size']}{data}{seed_part}"


def section(record: Dict[str, Any]) -> str:
    """One experiment's markdown: heading, reproduction line, run facts, tables, notes."""
    out = [f"## {record['name']} ({record['size']})\n",
           f"`{command_for(record)}`\n",
           f"Device: {record.get('device')}; data: {record.get('data_source')}; "
           f"wall time: {record.get('wall_time_s', 0):.0f} s.\n"]
    for title, table in (record.get("tables") or {}).items():
        out.append(f"**{title}**\n")
        if isinstance(table, list):
            out.append(markdown_table(table))
        elif isinstance(table, dict):
            out.append(markdown_table([{"key": k, "value": v} for k, v in table.items()]))
    for note in record.get("notes") or []:
        out.append(f"> {note}\n")
    return "\n".join(out)


def load_records(folder: str | Path) -> List[Dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    order = {name: i for i, name in enumerate(EXPERIMENT_ORDER)}
    return sorted((r for r in records if "name" in r and "tables" in r),
                  key=lambda r: (order.get(r["name"], len(order)), r["name"]))


def render(records: Iterable[Dict[str, Any]], title: str = "moe_lite: measured results") -> str:
    records = list(records)
    head = [f"# {title}\n",
            "Every table below was produced by the command above it (JSON and HTML reports in the "
            "output folder). Generation metrics are a Fréchet distance on the features of moe_lite's "
            "own Fashion-MNIST classifier (`fd_fmnist_classifier`), not Inception FID.\n"]
    if not records:
        head.append("_No results found._\n")
    return "\n".join(head + [section(r) for r in records])


def write_report(folder: str | Path, out: str | Path | None = None) -> str:
    text = render(load_records(folder))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text
