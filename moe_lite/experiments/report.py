"""Markdown results page from the JSON files that ``python -m moe_lite run`` writes.

    python -m moe_lite report results/ --out docs/results.md
    python -m moe_lite report docs/results/quick --intro docs/results-intro.md \
        --figures docs/results/figures --out docs/results.md

Every table comes from a run's JSON, with the command that reproduces it, the size, device, data
source and wall time, so the page never holds a number that no run produced. Under each experiment
the page adds its provenance (git commit, torch, device, threads, seeds), the paired comparisons of
its variants against its baseline (computed from the per-seed values when the JSON predates that
table) and the evaluation noise (binomial SE of an accuracy on the test split; the FD noise floor).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from ..settings import published_results_dir
from ..stats import PairedDifference, accuracy_se, check_sentence, compare_sentence, paired_difference
from .core import PAIRED_TABLE, UsageError, check_output_folder, paired_comparisons, seed_values
from .registry import EXPERIMENTS, pairing_of, write_figures

__all__ = ["UsageError", "check_output_folder", "load_records", "render", "section", "write_report", "published",
           "show_published", "record_comparison", "check_record_sentence", "expand_comparisons"]


#: the keys every record (a JSON file of ``run``) has, the optional ones, and their JSON types
_RECORD_KEYS = {"name": str, "size": str, "tables": dict}
_OPTIONAL_KEYS = {"config": dict, "notes": list, "wall_time_s": (int, float), "metrics": dict,
                  "provenance": dict}


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


def provenance_line(record: Dict[str, Any]) -> str:
    """One line of where the numbers came from (the record's ``provenance``, see
    :func:`moe_lite.experiments.core.provenance`), or that the run predates it."""
    p = record.get("provenance")
    if not p:
        return "Provenance: not recorded (the run predates provenance in the JSON).\n"
    commit = str(p.get("git_commit", "unknown"))
    dirty = " with uncommitted changes to moe_lite/" if p.get("git_dirty") else ""
    seeds = " ".join(str(s) for s in p.get("seeds") or []) or "-"
    models = ""
    if "models_loaded" in p:
        models = (f" This run trained {p['models_trained']} models and loaded {p['models_loaded']} finished "
                  f"ones from the cache (their training time is in the tables, not in the wall time).")
    return (f"Provenance: git {commit[:12]}{dirty}; torch {p.get('torch')}, Python {p.get('python')}; "
            f"{p.get('device')} ({p.get('device_name')}), {p.get('threads')} threads; seeds {seeds}.{models}\n")


def record_paired_table(record: Dict[str, Any]) -> Optional[tuple]:
    """(title, rows, note) of the record's paired comparisons: its own table, or one computed from
    the per-seed values of its metrics (pairing by the config's seed order when the values carry
    no seed ids, which the note says); None when there is none."""
    for title, rows in (record.get("tables") or {}).items():
        if title.startswith(PAIRED_TABLE):
            return title, rows, None
    metrics, seeds = record.get("metrics") or {}, (record.get("config") or {}).get("seeds") or []
    title, rows = paired_comparisons(pairing_of(record["name"]), metrics, seeds)
    if not rows:
        return None
    note = ("Computed by the report from the per-seed values stored in the JSON"
            + ("; they carry no seed ids, so seeds are paired in the config's seed order "
               f"({' '.join(str(s) for s in seeds)})." if not _has_seed_ids(metrics) else "."))
    return title, rows, note


def _has_seed_ids(value: Any) -> bool:
    """Whether any per-seed summary in ``value`` stores its seed ids."""
    if isinstance(value, dict):
        return ("values" in value and "seeds" in value) or any(_has_seed_ids(v) for v in value.values())
    return False


def _test_images(record: Dict[str, Any]) -> tuple:
    """(test images, how it is known): the stored count, or derived from the size config and the
    data source for records that did not store it."""
    config = record.get("config") or {}
    if isinstance(config.get("test_images"), int):
        return config["test_images"], ""
    classes = 5 if record["name"] == "adapt" else 10  # adapt tests on classes 5-9
    per_class = (config.get("size") or {}).get("test_per_class")
    if isinstance(per_class, int):
        return per_class * classes, " (derived from the size config: not stored in this JSON)"
    # the whole test split: 200 per class in the embedded subset (moe_lite.data), 1,000 in Fashion-MNIST
    per_class = 200 if record.get("data_source") == "embedded subset" else 1000
    return per_class * classes, " (the whole test split of the data source: not stored in this JSON)"


def evaluation_noise(record: Dict[str, Any]) -> List[str]:
    """Sentences on how noisy one evaluation is: the binomial standard error of the baseline's
    accuracy on the test split (or of the DiT's conditional accuracy on its samples), and the FD
    noise floor (real against real images at the same sample count) where the run stored it."""
    pairing = pairing_of(record["name"])
    metrics = record.get("metrics") or {}
    if pairing is None:
        return []
    base = next((g[pairing.first] for g in pairing.groups(metrics).values() if pairing.first in g), None)
    out = []
    if "accuracy" in pairing.metrics and isinstance(base, dict) and isinstance(base.get("accuracy"), dict):
        n, how = _test_images(record)
        p = base["accuracy"]["mean"]
        out.append(f"Evaluation noise: accuracies are measured on {n:,} test images{how}: the binomial "
                   f"standard error of one accuracy is {100 * accuracy_se(p, n):.2f} points at the "
                   f"baseline's {p:.3f}.")
    if "fd_fmnist_classifier" in pairing.metrics:
        samples = 10 * int(((record.get("config") or {}).get("size") or {}).get("samples_per_class") or 0)
        if isinstance(base, dict) and isinstance(base.get("conditional_accuracy"), dict) and samples:
            p = base["conditional_accuracy"]["mean"]
            out.append(f"Evaluation noise: conditional accuracy is measured on {samples:,} generated images: "
                       f"binomial standard error {100 * accuracy_se(p, samples):.2f} points at the baseline's "
                       f"{p:.3f}.")
        floor = metrics.get("real_fd_floor")
        if isinstance(floor, dict) and floor.get("mean") is not None:
            out.append(f"FD noise floor (real against real images, {floor.get('num_samples')} samples, "
                       f"{floor.get('draws')} draws): {floor['mean']:.2f} ± {floor.get('std') or 0:.2f}.")
        else:
            out.append("FD noise floor: not stored in this run (runs now store it as metrics['real_fd_floor']).")
    return out


def section(record: Dict[str, Any], figures: Optional[Mapping[str, str]] = None) -> str:
    """One experiment's markdown: heading, reproduction line, run facts, provenance, figures
    (name -> link), tables, paired comparisons against the baseline, evaluation noise, notes."""
    out = [f"## {record['name']} ({record['size']})\n",
           f"`{command_for(record)}`\n",
           f"Device: {record.get('device')}; data: {record.get('data_source')}; "
           f"wall time: {record.get('wall_time_s', 0):.0f} s.\n",
           provenance_line(record)]
    for name, link in (figures or {}).items():
        out.append(f"![{record['name']}: {name}]({link})\n")
    paired = record_paired_table(record)
    for title, table in (record.get("tables") or {}).items():
        if paired is not None and title == paired[0]:
            continue  # printed below, with the evaluation noise
        out.append(f"**{title}**\n")
        if isinstance(table, list):
            out.append(markdown_table(table))
        elif isinstance(table, dict):
            out.append(markdown_table([{"key": k, "value": v} for k, v in table.items()]))
    if paired is not None:
        title, rows, note = paired
        out += [f"**{title}**\n", markdown_table(rows)]
        if note:
            out.append(f"_{note}_\n")
    out += [f"{line}\n" for line in evaluation_noise(record)]
    for note in record.get("notes") or []:
        out.append(f"> {note}\n")
    return "\n".join(out)


def record_comparison(record: Dict[str, Any], name_a: str, name_b: str, metric: str,
                      group: str = "", confidence: float = 0.95) -> PairedDifference:
    """A against B in a result record (the JSON of ``run``), paired by seed: the per-seed values of
    ``metric`` (a key of a variant's entry, dotted for a nested one) of the variants ``name_a``
    and ``name_b``, found where the experiment keeps its variants (``group``: the training-set
    size for ``vimoe-grid``). Seed ids come from the values, else the config's seed order.
    KeyError naming what is missing."""
    pairing = pairing_of(record["name"])
    if pairing is None:
        raise KeyError(f"{record['name']}: no paired comparisons defined for this experiment")
    metrics = record.get("metrics") or {}
    groups = pairing.groups(metrics)
    if group not in groups:
        raise KeyError(f"{record['name']}: no group {group!r}; groups: {list(groups)}")
    entries, seeds = groups[group], (record.get("config") or {}).get("seeds") or []
    direction = pairing.metrics.get(metric)
    if direction is None:
        raise KeyError(f"{record['name']}: metric {metric!r} is not compared; compared: {list(pairing.metrics)}")
    per_seed = []
    for name in (name_a, name_b):
        summary = entries.get(name)
        for part in metric.split("."):
            summary = summary.get(part) if isinstance(summary, dict) else None
        if not isinstance(summary, dict) or "values" not in summary:
            raise KeyError(f"{record['name']}: no per-seed {metric!r} for {name!r}")
        per_seed.append(seed_values(summary, seeds))
    return paired_difference(per_seed[0], per_seed[1], confidence, direction)


def check_record_sentence(sentence: str, record: Dict[str, Any], name_a: str, name_b: str, metric: str,
                          group: str = "") -> None:
    """AssertionError unless ``sentence`` (on the page or in a notebook) states what the record's
    per-seed numbers support for A against B on ``metric`` (:func:`moe_lite.stats.check_sentence`):
    a claim the numbers stop supporting fails a test instead of drifting."""
    check_sentence(sentence, name_a, name_b, record_comparison(record, name_a, name_b, metric, group), metric)


#: ``{compare <experiment>[/<group>]: <A> vs <B> on <metric>}`` in the page's intro: replaced by the
#: sentence the per-seed numbers support (:func:`moe_lite.stats.compare_sentence`), so a finding that
#: compares two variants is written by the numbers, not by hand
COMPARE = re.compile(r"\{compare (?P<experiment>[\w-]+)(?:/(?P<group>[^:}]*))?: (?P<a>[^{}]+?) vs "
                     r"(?P<b>[^{}]+?) on (?P<metric>[\w.]+)\}")


#: how a compared metric is named in a sentence
METRIC_LABELS = {"fd_fmnist_classifier": "FD", "max_vio": "MaxVio", "conditional_accuracy": "conditional accuracy",
                 "experts_per_token": "experts per token"}


def expand_comparisons(text: str, records: Iterable[Dict[str, Any]]) -> str:
    """``text`` with every ``{compare ...}`` directive (:data:`COMPARE`) replaced by its sentence, e.g.
    ``{compare dynamic: top-p vs top-1 on accuracy}`` -> "top-p and top-1 are not separable on
    accuracy (top-p − top-1 = ..., 95% CI [...], 3 seeds)". :class:`UsageError` naming the directive
    when its experiment, variants or metric are not in ``records``."""
    by_name = {r["name"]: r for r in records}

    def sentence(match: "re.Match[str]") -> str:
        name, group = match["experiment"], match["group"] or ""
        if name not in by_name:
            raise UsageError(f"{match[0]}: no published result for {name!r}")
        try:
            result = record_comparison(by_name[name], match["a"], match["b"], match["metric"], group)
        except (KeyError, ValueError) as err:
            raise UsageError(f"{match[0]}: {err}") from None
        metric = match["metric"].split(".")[-1]
        return compare_sentence(match["a"], match["b"], result, METRIC_LABELS.get(metric, metric.replace("_", " ")))

    return COMPARE.sub(sentence, text)


def load_records(folder: str | Path) -> List[Dict[str, Any]]:
    """Every ``*.json`` of ``folder`` (each must be a record of ``run``: see :func:`read_record`),
    in the page's order; :class:`UsageError` when ``folder`` is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; "
                         f"give the folder where 'python -m moe_lite run' wrote its JSON files")
    records = [read_record(p) for p in sorted(folder.glob("*.json"))]
    order = {name: i for i, name in enumerate(EXPERIMENTS)}  # the registry's order
    return sorted(records, key=lambda r: (order.get(r["name"], len(order)), r["name"]))


def render(records: Iterable[Dict[str, Any]], title: str = "moe_lite: measured results",
           intro: Optional[str] = None, figures: Optional[Mapping[str, Mapping[str, str]]] = None) -> str:
    """The page: ``intro`` (markdown, e.g. the findings written from these tables, its ``{compare ...}``
    directives expanded: :func:`expand_comparisons`) or a title, then a section per record;
    ``figures``: experiment -> {figure name: link}."""
    records = list(records)
    head = [expand_comparisons(intro, records).rstrip() + "\n" if intro else f"# {title}\n",
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
        base = Path(out).parent if out is not None else Path.cwd()
        for record in records:
            paths = write_figures(record, figures, fmt=figure_format)
            links[record["name"]] = {name: Path(os.path.relpath(path, base)).as_posix() for name, path in paths.items()}
    text = render(records, intro=intro_text, figures=links)
    if out is not None:
        Path(out).write_text(text)
    return text


def published(name: str, size: str = "quick", root: str | Path | None = None,
              results_dir: str | Path | None = None) -> Dict[str, Any]:
    """The published result of experiment ``name`` (``<results_dir>/<size>/<name>.json``), as the
    results page shows it: notebooks quote these numbers.

    ``results_dir``: ``Settings.results_dir``; default :func:`moe_lite.settings.published_results_dir`
    (the checkout's ``docs/results``). ``root``: a repository root instead (``<root>/docs/results``).
    Raises ``FileNotFoundError`` (saying how to make the file) when there is no such file, e.g. in a
    pip-installed copy.
    """
    if root is not None:
        results_dir = Path(root) / "docs" / "results"
    elif results_dir is None:
        results_dir = published_results_dir()
    path = Path(results_dir or "docs/results") / size / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: published results live in the repository's docs/results/; "
                                f"make your own with: python -m moe_lite run {name} --size {size} --out results/")
    return json.loads(path.read_text())


class Markdown(str):
    """A string that Jupyter renders as markdown (and prints as itself everywhere else)."""

    def _repr_markdown_(self) -> str:
        return str(self)


def show_published(name: str, tables: Optional[Sequence[str]] = None, size: str = "quick",
                   results_dir: str | Path | None = None) -> Markdown:
    """The published tables of ``name`` (all, or those whose titles start with one of ``tables``)
    with the command that produced them, as markdown that a notebook cell renders as tables.
    ``results_dir``: as :func:`published`."""
    record = published(name, size, results_dir=results_dir)
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
