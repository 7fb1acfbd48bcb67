"""The results file: `results/experiments.md`, one section per experiment, each rewritten by its command.

A section lives between `<!-- begin NAME -->` and `<!-- end NAME -->`; a command replaces its own
section and leaves the others as they are. Sections are kept in the paper's order. The numbers of
every section (and its claims) are also kept in `results/experiments.json`, from which the summary
at the top of the markdown file is rebuilt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ORDER = ("fig2", "fig6", "table2", "table3", "nft")
TITLE = "# The AR-CoPO paper's experiments on the pocket world"
PREAMBLE = (
    "Written by `python -m experiments.run` (do not edit by hand; docs/experiments.md says how to run each).\n"
    "Every number below comes from runs the command performed; mean ± spread is the mean and the sample\n"
    "standard deviation over training seeds. Rewards are the pocket verifiers' heads (higher is better,\n"
    "Overall = TA + VQ + MQ as VideoAlign's); FVD-p is the out-of-domain Frechet distance to real\n"
    "domain videos (`pocket.ood_metric`, lower is better; it plays VBench's role)."
)
_SECTION = re.compile(r"<!-- begin (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- end (?P=name) -->\n?", re.S)


@dataclass
class Claim:
    statement: str  # the paper's claim
    holds: bool | None  # None: not testable at this budget (e.g. one seed)
    evidence: str  # the numbers and the criterion

    @property
    def verdict(self) -> str:
        return {True: "**holds**", False: "**does not hold**", None: "**not decided**"}[self.holds]

    def markdown(self) -> str:
        return f"- {self.statement}: {self.verdict}. {self.evidence}"


@dataclass
class Section:
    name: str
    title: str
    body: str  # markdown: budget, tables, images
    claims: list[Claim] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # the section's numbers, for results/experiments.json

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", self.body.strip(), ""]
        if self.claims:
            parts += ["Claims at this scale:", "", *(c.markdown() for c in self.claims), ""]
        return "\n".join(parts)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def read_sections(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in _SECTION.finditer(text)}


def write_section(results_dir: Path, section: Section) -> Path:
    """Replace (or add) `section` in results/experiments.md and its numbers in results/experiments.json."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = results_dir / "experiments.md", results_dir / "experiments.json"
    sections = read_sections(md_path.read_text()) if md_path.is_file() else {}
    sections[section.name] = section.markdown()
    data = json.loads(json_path.read_text()) if json_path.is_file() else {}
    data[section.name] = {"title": section.title, "claims": [asdict(c) for c in section.claims], **section.data}
    json_path.write_text(json.dumps(data, indent=1, sort_keys=True, default=float) + "\n")

    names = [n for n in ORDER if n in sections] + sorted(n for n in sections if n not in ORDER)
    parts = [TITLE, "", PREAMBLE, "", summary(data, names), ""]
    for name in names:
        parts += [f"<!-- begin {name} -->", sections[name].rstrip("\n"), f"<!-- end {name} -->", ""]
    md_path.write_text("\n".join(parts))
    return md_path


def summary(data: dict, names: Sequence[str]) -> str:
    lines = ["## Summary: the paper's claims at pocket scale", ""]
    for name in names:
        for claim in data.get(name, {}).get("claims", []):
            claim = Claim(**claim)
            lines.append(f"- {claim.statement} ({name}): {claim.verdict}.")
    if len(lines) == 2:
        lines.append("No experiment has been run yet.")
    return "\n".join(lines)
