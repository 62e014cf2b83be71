"""The README's table of HF PEFT's public names tells the truth about `lightning_peft`.

Every name the installed `peft` exports has a row; a name in a row marked provided imports from `lightning_peft`,
a name in a row marked "not provided" does not. A newer `peft` with new names fails here until the table says
what we do with them.
"""

import re
from pathlib import Path

import pytest

import lightning_peft

peft = pytest.importorskip("peft")

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_HEADING = "### HF PEFT's public names here"


def table_rows() -> list[tuple[set[str], str]]:
    """(identifiers named in the first column, status column) of each row of the table."""
    text = README.read_text(encoding="utf-8")
    assert TABLE_HEADING in text, f"README lost its section {TABLE_HEADING!r}"
    section = text.split(TABLE_HEADING, 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| HF PEFT"):
            continue
        # the first column ends at the first "|" that is not escaped (signatures write `a \| b`)
        first, status = re.split(r"(?<!\\)\|", line.strip("| "), maxsplit=1)
        names = {m.group(1) for m in re.finditer(r"`([A-Za-z_][A-Za-z0-9_.]*)", first)}
        rows.append(({n.rsplit(".", 1)[-1] for n in names}, status.strip()))
    assert len(rows) >= 15, "the table was not parsed (its layout changed?)"
    return rows


def test_every_public_name_of_hf_peft_has_a_row() -> None:
    named = set().union(*(names for names, _ in table_rows()))
    missing = sorted(set(peft.__all__) - named)
    assert not missing, f"HF PEFT names without a row in the README's table: {missing}"


def test_each_row_says_truly_whether_the_name_is_provided() -> None:
    wrong = []
    for names, status in table_rows():
        provided = not status.startswith("not provided")
        for name in names & set(peft.__all__):
            if hasattr(lightning_peft, name) != provided:
                wrong.append((name, status[:40]))
    assert not wrong, f"rows whose status is not true of lightning_peft: {wrong}"
