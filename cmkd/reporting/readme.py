"""The README's result sections, generated from a run's reports (never typed by hand).

README.md holds two generated blocks between marker comments:

    <!-- results:start --> ... <!-- results:end -->   every dataset's data/reports/<ds>/table.md
    <!-- claims:start -->  ... <!-- claims:end -->    data/reports/claims.md (the experiments)

`python -m stages readme` rewrites them from data/reports/ after a run (`--check` only says
whether README.md is current). Pure functions here; the command is in stages/readme.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from cmkd.errors import CmkdError

BLOCKS = ("results", "claims")


class ReadmeError(CmkdError):
    pass


def _demote(markdown: str, to_level: int) -> str:
    """Headings shifted so the shallowest one sits at `to_level` (the README's nesting)."""
    levels = [len(m.group(1)) for m in re.finditer(r"^(#+) ", markdown, re.M)]
    if not levels:
        return markdown
    shift = to_level - min(levels)
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + shift) + " ", markdown, flags=re.M)


def results_block(reports: Path, datasets: Sequence[str]) -> str:
    """Each dataset's table.md, in the order of `datasets`, headings at level 4."""
    parts = []
    for ds in datasets:
        table = Path(reports) / ds / "table.md"
        if not table.is_file():
            raise ReadmeError(f"{table}: missing (run the pipeline for dataset {ds!r} first)")
        parts.append(_demote(table.read_text().strip(), 4))
    return "\n\n".join(parts)


def claims_block(reports: Path) -> str:
    """data/reports/claims.md, its title dropped (the README section has one)."""
    path = Path(reports) / "claims.md"
    if not path.is_file():
        raise ReadmeError(f"{path}: missing (run `dvc repro check` first)")
    text = re.sub(r"\A# [^\n]*\n+", "", path.read_text().strip() + "\n")
    return _demote(text.strip(), 4)


def blocks(reports: Path, datasets: Sequence[str]) -> dict[str, str]:
    return {"results": results_block(reports, datasets), "claims": claims_block(reports)}


def replace_blocks(readme: str, generated: dict[str, str]) -> str:
    """`readme` with the text between each block's markers replaced by `generated[block]`."""
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- {name}:start[^>]*-->\n).*?(\n<!-- {name}:end -->)", re.S)
        if len(pattern.findall(readme)) != 1:
            raise ReadmeError(f"README.md: needs exactly one '<!-- {name}:start -->' ... '<!-- {name}:end -->' pair")
        readme = pattern.sub(lambda m: m.group(1) + body.strip() + m.group(2), readme)
    return readme
