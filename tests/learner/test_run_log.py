import json

import pytest

from learner.run_log import MetricsLog, plot_reward_curves


def _row(i, **extra):
    return {"iteration": i, "reward_mean": 0.1 * i, "reward_TA": 0.2 * i, "loss": 1.0, "clip_fraction": 0.0,
            "policy_version": i, **extra}


def test_rows_round_trip_and_torn_last_line_is_ignored(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for i in range(3):
        log.append(_row(i))
    with log.path.open("a") as f:
        f.write('{"iteration": 3, "rew')  # a crash mid-write
    assert [r["iteration"] for r in log.read()] == [0, 1, 2]
    log.truncate_after(2)
    assert [r["iteration"] for r in log.read()] == [0, 1]
    assert all(json.loads(line) for line in log.path.read_text().splitlines())


def test_nan_is_written_as_null_and_still_plots(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(_row(0, clip_fraction=float("nan"), reward_TA=float("nan")))
    log.append(_row(1))
    assert '"clip_fraction": null' in log.path.read_text().splitlines()[0]
    assert log.read()[0]["reward_TA"] is None
    assert plot_reward_curves(log.read(), tmp_path / "r.png").stat().st_size > 5000


def test_a_row_without_required_keys_is_refused(tmp_path):
    with pytest.raises(ValueError, match="policy_version"):
        MetricsLog(tmp_path / "m.jsonl").append({"iteration": 0, "reward_mean": 0, "loss": 0, "clip_fraction": 0})


def test_reward_curve_png_is_written(tmp_path):
    rows = [_row(i, **({"eval_reward_mean": 0.3 * i, "eval_reward_TA": 0.1} if i % 2 == 0 else {})) for i in range(5)]
    out = plot_reward_curves(rows, tmp_path / "reward.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_the_out_of_domain_metric_is_drawn_beside_the_held_out_reward():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from learner.run_log import _plot_ood

    rows = [_row(0, base_eval_fvd_p=100.0)] + [_row(i) for i in range(1, 4)]
    rows[1].update(eval_fvd_p=110.0)
    rows[3].update(eval_fvd_p=130.0)
    fig, ax = plt.subplots()
    _plot_ood(ax, rows)
    twins = [a for a in fig.axes if a is not ax]
    assert len(twins) == 1  # a right-hand axis: FVD-p's scale is not the rewards'
    (line,) = twins[0].get_lines()
    # the base at 0, then each evaluation after the iterations it followed (rows 1 and 3: 2 and 4 updates)
    assert list(line.get_xdata()) == [0, 2, 4] and list(line.get_ydata()) == [100.0, 110.0, 130.0]
    fig2, ax2 = plt.subplots()
    _plot_ood(ax2, [_row(0), _row(1)])
    assert fig2.axes == [ax2]  # nothing to draw, no axis added
    plt.close(fig)
    plt.close(fig2)
