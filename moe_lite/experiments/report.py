"""Markdown results page from the JSON files that ``python -m moe_lite run`` writes.

    python -m moe_lite report results/ --out docs/results.md
    python -m moe_lite report docs/results/quick --intro docs/results-intro.md \
        --figures docs/results/figures --out docs/results.md

Every table comes from a run's JSON, with the command that reproduces it, the size, device, data
source and wall time, so the page never holds a number that no run produced.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

EXPERIMENT_ORDER = ("race", "dit", "dynamic", "sequence", "vimoe-grid", "vimoe", "adapt", "zoo", "balance")


class UsageError(ValueError):
    """A bad argument or input file, found before any work; the message names it (the command line
    prints it as one line and exits with code 2)."""


def check_output_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` (and its parents) if needed and check a file can be written there, with a
    probe file that is removed again; raises :class:`UsageError` naming ``what`` (the argument,
    e.g. ``"out results/"``) and the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".moe_lite-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "a file of that name is in the way" if folder.is_file() else err.strerror or str(err)
        raise UsageError(f"{what}: cannot create or write the folder {folder} ({reason})") from None
    return folder


#: the keys every record (a JSON file of ``run``) has, the optional ones, and their JSON types
_RECORD_KEYS = {"name": str, "size": str, "tables": dict}
_OPTIONAL_KEYS = {"config": dict, "notes": list, "wall_time_s": (int, float), "metrics": dict}


def read_record(path: Path) -> Dict[str, Any]:
    """One JSON file of ``run``, checked to have the shape the page needs; :class:`UsageError`
    naming the file when it is unreadable, not JSON, or not such a record."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}: a JSON {type(record).__name__}, expected the object 'run' writes")
    for key, kind in {**_RECORD_KEYS, **_OPTIONAL_KEYS}.items():
        if key not in record:
            if key in _RECORD_KEYS:
                raise UsageError(f"{path}: no {key!r}; not a result of 'python -m moe_lite run'")
        elif not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise UsageError(f"{path}: {key!r} is a JSON {type(record[key]).__name__}; not a result of "
                             f"'python -m moe_lite run'")
    return record


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
    selected = record.get("config", {}).get("selected_variants")
    variant_part = " --variants " + " ".join(shlex.quote(v) for v in selected) if selected else ""
    return f"python -m moe_lite run {record['name']} --size {record['size']}{data}{seed_part}{variant_part}"


def section(record: Dict[str, Any], figures: Optional[Mapping[str, str]] = None) -> str:
    """One experiment's markdown: heading, reproduction line, run facts, figures (name -> link),
    tables, notes."""
    out = [f"## {record['name']} ({record['size']})\n",
           f"`{command_for(record)}`\n",
           f"Device: {record.get('device')}; data: {record.get('data_source')}; "
           f"wall time: {record.get('wall_time_s', 0):.0f} s.\n"]
    for name, link in (figures or {}).items():
        out.append(f"![{record['name']}: {name}]({link})\n")
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
    """Every ``*.json`` of ``folder`` (each must be a record of ``run``: see :func:`read_record`),
    in the page's order; :class:`UsageError` when ``folder`` is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; "
                         f"give the folder where 'python -m moe_lite run' wrote its JSON files")
    records = [read_record(p) for p in sorted(folder.glob("*.json"))]
    order = {name: i for i, name in enumerate(EXPERIMENT_ORDER)}
    return sorted(records, key=lambda r: (order.get(r["name"], len(order)), r["name"]))


def render(records: Iterable[Dict[str, Any]], title: str = "moe_lite: measured results",
           intro: Optional[str] = None, figures: Optional[Mapping[str, Mapping[str, str]]] = None) -> str:
    """The page: ``intro`` (markdown, e.g. the findings written from these tables) or a title, then
    a section per record; ``figures``: experiment -> {figure name: link}."""
    records = list(records)
    head = [intro.rstrip() + "\n" if intro else f"# {title}\n",
            "Every table below was produced by the command above it (JSON and HTML reports in the "
            "output folder). Generation metrics are a Fréchet distance on the features of moe_lite's "
            "own Fashion-MNIST classifier (`fd_fmnist_classifier`), not Inception FID.\n"]
    if not records:
        head.append("_No results found._\n")
    figures = figures or {}
    return "\n".join(head + [section(r, figures.get(r["name"])) for r in records])


def write_report(folder: str | Path, out: str | Path | None = None, intro: str | Path | None = None,
                 figures: str | Path | None = None, figure_format: str = "svg") -> str:
    """Render the page from ``folder``'s JSON files; optionally prepend the markdown file ``intro``
    and draw each experiment's summary figures into the folder ``figures`` (links are relative to
    ``out``).

    Every input and output is checked before anything is drawn or written: :class:`UsageError`
    naming the file or folder at fault.
    """
    records = load_records(folder)
    intro_text = None
    if intro is not None:
        try:
            intro_text = Path(intro).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"intro {intro}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if out is not None:
        if Path(out).is_dir():
            raise UsageError(f"out {out}: is a folder; give the markdown file to write")
        check_output_folder(Path(out).parent, f"out {out}")
    if figures is not None:
        if figure_format in ("svg", "png") and importlib.util.find_spec("kaleido") is None:
            raise UsageError(f"figures as {figure_format} need kaleido (pip install 'kaleido>=1'); "
                             f"or use --figure-format html")
        check_output_folder(figures, f"figures {figures}")
    links: Dict[str, Dict[str, str]] = {}
    if figures is not None:
        from .figures import write_figures

        base = Path(out).parent if out is not None else Path.cwd()
        for record in records:
            paths = write_figures(record, figures, fmt=figure_format)
            links[record["name"]] = {name: Path(os.path.relpath(path, base)).as_posix() for name, path in paths.items()}
    text = render(records, intro=intro_text, figures=links)
    if out is not None:
        Path(out).write_text(text)
    return text


def published(name: str, size: str = "quick", root: str | Path | None = None) -> Dict[str, Any]:
    """The published result of experiment ``name`` (``docs/results/<size>/<name>.json`` of the
    repository), as the results page shows it: notebooks quote these numbers.

    Raises ``FileNotFoundError`` (saying how to make the file) when the repository's ``docs`` folder
    is not there, e.g. in a pip-installed copy.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    path = root / "docs" / "results" / size / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: published results live in the repository's docs/results/; "
                                f"make your own with: python -m moe_lite run {name} --size {size} --out results/")
    return json.loads(path.read_text())


class Markdown(str):
    """A string that Jupyter renders as markdown (and prints as itself everywhere else)."""

    def _repr_markdown_(self) -> str:
        return str(self)


def show_published(name: str, tables: Optional[Sequence[str]] = None, size: str = "quick") -> Markdown:
    """The published tables of ``name`` (all, or those whose titles start with one of ``tables``)
    with the command that produced them, as markdown that a notebook cell renders as tables."""
    record = published(name, size)
    chosen = {t: v for t, v in record["tables"].items()
              if tables is None or any(t.startswith(prefix) for prefix in tables)}
    if not chosen:
        raise ValueError(f"{name} has no published table starting with {list(tables or [])}; "
                         f"its tables: {list(record['tables'])}")
    parts = [f"Published run: `{command_for(record)}` ({record.get('device')}, "
             f"wall time {record.get('wall_time_s', 0):.0f} s)\n"]
    for title, rows in chosen.items():
        parts += [f"**{title}**\n", markdown_table(rows) if isinstance(rows, list) else str(rows)]
    return Markdown("\n".join(parts))
