"""Every number the prose quotes is a number its outputs show.

A notebook's markdown and the results page's findings (``docs/results-intro.md``) describe measured
outputs; when a re-run changes an output, the sentence quoting the old value must fail here rather
than drift. Checked: decimals with two or more decimal places and percentages with a decimal
(``0.822``, ``1.73``, ``69.6%``), which is how the prose quotes measurements. A quoted number passes
when some number in the stored outputs (a notebook's outputs, figure data included; the page's JSON
results) rounds to it at the precision it is written with (sign aside; a percentage may also be a
fraction x 100).

Not checked, by convention: a value the sentence derives itself (right after ``=`` or ``≈``), numbers in inline code (settings, formulas), arXiv ids, blockquote lines,
and sentences that cite a source (``paper``, ``Table``, ``Fig.``, ``et al.``): a paper's numbers are
checked against ``research/papers.md`` by review, not against our outputs. So a sentence that quotes a
paper keeps our own numbers in a sentence of their own.
"""
import base64
import json
import re
from pathlib import Path
from typing import Iterable, List, Set, Tuple

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
QUOTED = re.compile(r"(?<![\w.])(\d+\.\d{2,}|\d+\.\d+(?=%))(%?)(?![\w]|\.\d)")
ANY_NUMBER = re.compile(r"\d*\.\d+(?:[eE][-+]?\d+)?|\d+")
#: a value right after "=" or "≈" is derived in the sentence itself ("1/E = 0.25", "log2 6 = 2.58")
DERIVED = re.compile(r"[=≈]\s*$")
CITES_A_SOURCE = re.compile(r"paper|Table|Fig\.|et al\.")


def prose_sentences(markdown: str) -> Iterable[str]:
    """The checked sentences of a markdown text: paragraphs joined across lines, blockquotes, inline
    code and arXiv ids removed, sentences that cite a source skipped."""
    for paragraph in re.split(r"\n\s*\n", markdown):
        lines = [ln for ln in paragraph.splitlines() if not ln.lstrip().startswith(">")]
        text = re.sub(r"`[^`]*`", " ", " ".join(lines))
        text = re.sub(r"arXiv:? ?\d{4}\.\d{4,5}", " ", text)
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z(*_-])", text):
            if not CITES_A_SOURCE.search(sentence):
                yield sentence


def quoted_numbers(markdown: str) -> List[Tuple[str, str]]:
    """``(number as written, its sentence)`` for every checked number of ``markdown``."""
    return [(m.group(1) + m.group(2), sentence) for sentence in prose_sentences(markdown)
            for m in QUOTED.finditer(sentence) if not DERIVED.search(sentence[:m.start()])]


def shown_numbers(texts: Iterable[str]) -> Set[float]:
    return {float(x) for text in texts for x in ANY_NUMBER.findall(text)}


def supported(quoted: str, shown: Set[float]) -> bool:
    percent = quoted.endswith("%")
    digits = quoted.rstrip("%")
    value, decimals = float(digits), len(digits.split(".")[1])
    candidates = [1.0, 100.0] if percent else [1.0]
    # half a unit in the last written place (so 0.365 may be written 0.36 or 0.37)
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(abs(x) * scale - value) <= tolerance for x in shown for scale in candidates)


def _decoded(value):
    """``value`` with plotly's packed arrays (``{"dtype": ..., "bdata": base64}``) unpacked to lists."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
            return array.tolist()
        return {k: _decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def notebook_outputs(nb: dict) -> List[str]:
    texts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if "text" in out:
                texts.append("".join(out["text"]))
            for value in out.get("data", {}).values():
                texts.append("".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value)
                             else json.dumps(_decoded(value)))
    return texts


def unsupported(markdown: str, shown: Set[float]) -> List[str]:
    return [f"{number}   in: {sentence.strip()[:160]}" for number, sentence in quoted_numbers(markdown)
            if not supported(number, shown)]


# ---- the checker itself ------------------------------------------------------------------------------
def test_the_checker_flags_a_number_no_output_shows():
    shown = shown_numbers(["accuracy 0.8215", "experts per token 1.7349", "share 0.696"])
    assert unsupported("Top-p reached 0.822 with 1.73 experts; 69.6% of pairs.", shown) == []
    bad = unsupported("Top-p reached 0.831 with 1.73 experts.", shown)
    assert len(bad) == 1 and bad[0].startswith("0.831")
    # sources, code, blockquotes and arXiv ids are not ours to check
    assert unsupported("The paper reports FID 10.13 (arXiv 2503.16057).\n\n> 9.08 in Table 6\n\n"
                       "We used `p=0.45`.", shown) == []
    # a sentence of our own beside a cited one is still checked
    assert len(unsupported("Its Table 3 gives 13.66. Here it gave 0.99.", shown)) == 1
    assert unsupported("The task entropy is log2 6 = 2.58 bits.", shown) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_prose_quotes_its_outputs(path):
    nb = json.loads(path.read_text())
    shown = shown_numbers(notebook_outputs(nb))
    markdown = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    bad = unsupported(markdown, shown)
    assert not bad, (f"{path.name}: the prose quotes numbers no stored output shows (re-executed outputs "
                     "changed? update the sentence):\n  " + "\n  ".join(bad))


def test_results_findings_quote_the_published_json():
    shown = shown_numbers(p.read_text() for p in (ROOT / "docs" / "results").rglob("*.json"))
    bad = unsupported((ROOT / "docs" / "results-intro.md").read_text(), shown)
    assert not bad, ("docs/results-intro.md quotes numbers no published JSON holds:\n  " + "\n  ".join(bad))


def test_results_page_is_rendered_from_the_published_json():
    """docs/results.md is exactly what ``python -m moe_lite report`` writes from the published JSON and
    docs/results-intro.md (figure links aside), so its comparison sentences are the numbers' own."""
    from moe_lite.experiments.report import load_records, render

    records = load_records(ROOT / "docs" / "results" / "quick")
    expected = render(records, intro=(ROOT / "docs" / "results-intro.md").read_text())
    page = (ROOT / "docs" / "results.md").read_text()

    def lines(text):
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("![")]

    assert lines(page) == lines(expected), "re-run: python -m moe_lite report docs/results/quick --intro " \
        "docs/results-intro.md --figures docs/results/figures --out docs/results.md"
