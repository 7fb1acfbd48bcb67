"""Each experiment's section (tables, claims, plots) built from synthetic runs and scores, checked against
hand computations; and the results file keeping the other sections when one is rewritten."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import fig2, fig6, table2, table3
from experiments.report import Claim, Section, read_sections, write_section
from experiments.tables import Scores
from experiments.training import RunResult


def _scores(overall: float, fvd: float, ta: float | None = None) -> Scores:
    ta = overall / 3 if ta is None else ta
    rest = (overall - ta) / 2
    return Scores({"TA": ta, "VQ": rest, "MQ": rest}, overall, fvd)


def _run(tmp_path, label, seed, rewards, silent=None):
    silent = silent or [0] * len(rewards)
    rows = [{"iteration": i, "reward_mean": r, "reward_VQ": r / 3, "groups": 4, "groups_without_signal": s}
            for i, (r, s) in enumerate(zip(rewards, silent))]
    return RunResult(label, seed, tmp_path / f"{label}-{seed}", rows, wall_s=10.0 + seed, reused=False)


def _table_row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_fig2_table_curves_and_claim(tmp_path):
    runs = {
        "AR-CoPO": [_run(tmp_path, "copo", 0, [1, 2, 3, 4], silent=[0, 1, 0, 1]), _run(tmp_path, "copo", 1, [2, 2, 2, 6])],
        "SDE-GRPO": [_run(tmp_path, "sde", 0, [1, 1, 1, 1]), _run(tmp_path, "sde", 1, [2, 2, 2, 2])],
    }
    base = _scores(1.0, 10.0)
    final = {"AR-CoPO": [_scores(1.2, 9.0), _scores(1.3, 9.5)], "SDE-GRPO": [_scores(1.0, 10.0), _scores(0.98, 10.2)]}
    section = fig2.build_section(runs, base, final, "budget line", tmp_path)

    row = _table_row(section.body, "AR-CoPO")
    # first 3 iterations: 2 and 2; last 3: 3 and 10/3; change 1 and 4/3 (std of {1, 4/3} = 0.2357)
    assert row[1:4] == ["2.000 ± 0.000", "3.167 ± 0.236", "1.167 ± 0.236"]
    # held-out: base 1.0, ends 1.2 and 1.3 -> change 0.25 ± 0.0707; silent groups 2/16 and 0/16
    assert row[4:] == ["1.000", "1.250 ± 0.071", "0.250 ± 0.071", "0.06 ± 0.09"]
    assert _table_row(section.body, "SDE-GRPO")[6] == "-0.010 ± 0.014"
    assert [c.holds for c in section.claims] == [True]  # 0.25 > 2 x 0.05; SDE-GRPO's change is negative
    assert section.data["held_out_change"]["SDE-GRPO"]["mean"] == pytest.approx(-0.01)
    assert _is_png(tmp_path / "fig2_reward_curves.png")

    final["SDE-GRPO"] = [_scores(1.2, 9.0), _scores(1.25, 9.0)]  # SDE-GRPO rises as well: the claim fails
    assert [c.holds for c in fig2.build_section(runs, base, final, "", tmp_path).claims] == [False]

    one_seed = {m: rs[:1] for m, rs in runs.items()}  # no spread: the claim is left undecided
    claims = fig2.build_section(one_seed, base, {m: ss[:1] for m, ss in final.items()}, "", tmp_path).claims
    assert [c.holds for c in claims] == [None]


def test_fig6_ratios_per_chunk_and_claim(tmp_path):
    initial = np.array([[0.5, 0.8], [0.3, 0.9]])  # [seeds, chunks]
    renoise = np.array([[[0.01, 0.02, 0.03], [0.01, 0.01, 0.01]], [[0.03, 0.03, 0.03], [0.02, 0.02, 0.02]]])
    section = fig6.build_section(initial, renoise, tmp_path, "note")
    row0, row1 = _table_row(section.body, "0"), _table_row(section.body, "1")
    assert row0[1] == "0.4000 ± 0.1414"
    assert row0[2:5] == ["0.0200 ± 0.0141", "0.0250 ± 0.0071", "0.0300 ± 0.0000"]
    # ratios per seed: chunk 0 -> 0.5/0.02 = 25 and 0.3/0.03 = 10; chunk 1 -> 80 and 45
    assert row0[5] == f"17.50 ± {np.std([25, 10], ddof=1):.2f}"
    assert row1[5] == f"62.50 ± {np.std([80, 45], ddof=1):.2f}"
    assert section.claims[0].holds and "grows" in section.claims[0].evidence
    assert _is_png(tmp_path / "fig6_entropy_sources.png")

    flat = fig6.build_section(initial, np.full_like(renoise, 0.2), tmp_path, "note")
    assert flat.claims[0].holds is False  # chunk 0 of seed 1: 0.3 / 0.2 = 1.5x


def test_table2_rows_and_claims(tmp_path):
    base = _scores(1.5, 10.0, ta=0.4)
    final = {
        "on-policy": [_scores(1.4, 13.0, ta=0.6), _scores(1.3, 14.0, ta=0.7)],
        "semi-on-policy": [_scores(1.5, 10.5, ta=0.45), _scores(1.52, 10.3, ta=0.41)],
        "off-policy": [_scores(1.0, 12.0), _scores(1.1, 11.0)],
    }
    runs = {m: [_run(tmp_path, m, s, [1.0]) for s in (0, 1)] for m in final}
    section = table2.build_section(runs, base, final, "budget line", tmp_path)
    on = _table_row(section.body, "on-policy")
    assert on[1:3] == ["2", "0.650 ± 0.071"]  # seeds, TA
    assert on[5:] == ["1.350 ± 0.071", "13.50 ± 0.71"]  # Overall, FVD-p
    assert _table_row(section.body, "base (pocket generator)")[5:] == ["1.500", "10.00"]
    keep, collapse = section.claims
    assert keep.holds and "+4%" in keep.evidence and "+35%" in keep.evidence  # semi 10.4 vs 10; on 13.5 vs 10
    assert collapse.holds and "-30%" in collapse.evidence  # off Overall 1.05 vs 1.5
    assert _is_png(tmp_path / "table2_rewards.png") and _is_png(tmp_path / "table2_fvd.png")

    final["semi-on-policy"] = [_scores(1.5, 12.0), _scores(1.5, 12.0)]  # +20 %: not kept
    final["off-policy"] = [_scores(1.45, 11.0), _scores(1.45, 11.0)]  # -3 %, 1.1x: no collapse
    assert [c.holds for c in table2.table2_claims(base, final)] == [False, False]


def test_table3_selection_on_means_and_per_seed(tmp_path):
    scales = (0.0, 0.4, 0.5, 0.6, 0.8, 1.0)
    base = _scores(1.0, 10.0)
    # seed 0: Overall 0.9 + 0.3 s, FVD 9 + 1.5 s -> improves both for s in {0.4, 0.5, 0.6}: picks 0.6
    # seed 1: Overall 0.92 + 0.3 s, FVD 9.5 + 1.5 s -> FVD below 10 needs s < 1/3, Overall above 1 needs s > 0.27: none
    sweeps = [{s: _scores(0.9 + 0.3 * s, 9.0 + 1.5 * s) for s in scales}, {s: _scores(0.92 + 0.3 * s, 9.5 + 1.5 * s) for s in scales}]
    runs = [_run(tmp_path, "semi", 0, [1.0]), _run(tmp_path, "on", 0, [1.0])]
    section = table3.build_section(runs, base, sweeps, "budget line", tmp_path)
    # means: Overall 0.91 + 0.3 s > 1 needs s > 0.3; FVD 9.25 + 1.5 s < 10 needs s < 0.5 -> only 0.4
    assert section.data["selected_scale"] == 0.4
    assert section.data["selected_per_seed"] == [0.6, None]
    assert _table_row(section.body, "0.4")[-1] == "1/2 **selected**"
    assert _table_row(section.body, "0.6")[-1] == "1/2"
    assert _table_row(section.body, "1")[-1] == "0/2"
    assert _table_row(section.body, "0 (semi only)")[5] == "0.910 ± 0.014"  # Overall at s = 0
    claim = section.claims[0]
    assert claim.holds and "Overall +1.00, FVD-p +1.00" in claim.evidence
    assert _is_png(tmp_path / "table3_merge_sweep.png")

    flat = [{s: _scores(1.1, 9.0) for s in scales}]  # merging changes nothing: no trade-off
    assert table3.build_section(runs, base, flat, "", tmp_path).claims[0].holds is False


def test_results_file_keeps_other_sections_and_paper_order(tmp_path):
    write_section(tmp_path, Section("table3", "T3", "first body", [Claim("merging trades", True, "numbers")], {"x": 1}))
    write_section(tmp_path, Section("fig2", "F2", "fig2 body", [Claim("copo rises", False, "more numbers")]))
    write_section(tmp_path, Section("table3", "T3", "second body", [Claim("merging trades", None, "n")], {"x": 2}))
    text = (tmp_path / "experiments.md").read_text()
    sections = read_sections(text)
    assert list(sections) == ["fig2", "table3"]
    assert "second body" in sections["table3"] and "first body" not in text
    assert "fig2 body" in sections["fig2"]
    assert "- copo rises (fig2): **does not hold**." in text and "- merging trades (table3): **not decided**." in text
    data = json.loads((tmp_path / "experiments.json").read_text())
    assert data["table3"]["x"] == 2 and data["fig2"]["claims"][0]["holds"] is False
