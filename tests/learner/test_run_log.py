import json

import pytest

from controller.run_log import MetricsLog, plot_reward_curves, reward_curve_series, reward_heads


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


def test_reward_curve_draws_heads_not_timings_and_the_base_score_at_zero():
    """Rows as the driver writes them: the reward phase's timing `reward_s` beside the heads, the
    base model's held-out score in the first row, an evaluation after iterations 1 and 3."""
    rows = [
        _row(0, reward_VQ=0.5, reward_s=7.0, rollout_s=9.0, base_eval_reward_mean=1.0, base_eval_reward_TA=0.4,
             base_eval_reward_VQ=0.6),
        _row(1, reward_VQ=0.6, reward_s=8.0, eval_reward_mean=1.2, eval_reward_TA=0.5, eval_reward_VQ=0.7),
        _row(2, reward_VQ=0.7, reward_s=9.0),
        _row(3, reward_VQ=0.8, reward_s=9.5, eval_reward_mean=1.5, eval_reward_TA=0.6, eval_reward_VQ=0.9),
    ]
    assert reward_heads(rows) == ["TA", "VQ"]
    train, heldout = reward_curve_series(rows)
    assert set(train) == {"combined", "TA", "VQ"}
    assert train["VQ"] == ([0.0, 1.0, 2.0, 3.0], [0.5, 0.6, 0.7, 0.8])
    assert train["combined"][1] == [r["reward_mean"] for r in rows]
    assert set(heldout) == {"combined", "TA", "VQ"}
    assert heldout["combined"] == ([0.0, 2.0, 4.0], [1.0, 1.2, 1.5])  # base first, then after 2 and 4 iterations
    assert heldout["TA"] == ([0.0, 2.0, 4.0], [0.4, 0.5, 0.6])


def test_reward_head_names_that_clash_with_metrics_columns_are_refused():
    from controller.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reward.weights"):
        load_config(None, ["reward.weights={s: 1.0}"])


def test_passwords_in_urls_are_redacted_in_log_lines_and_metrics(tmp_path):
    import logging

    from controller.run_log import RedactingFilter

    path = tmp_path / "run.log"
    logger = logging.getLogger("test_redaction")
    handler = logging.FileHandler(path)
    logger.addHandler(handler)
    try:
        RedactingFilter.install(logger)
        RedactingFilter.install(logger)  # once per handler
        assert len(handler.filters) == 1
        logger.warning("store %s unreachable", "redis://:hunter2@10.0.0.5:6379/0?prefix=r")
        try:
            raise ConnectionError("cannot reach rediss://admin:hunter2@cache:6380/1")
        except ConnectionError:
            logger.exception("learner call failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = path.read_text()
    assert "hunter2" not in text
    assert "redis://:***@10.0.0.5:6379/0?prefix=r" in text and "rediss://admin:***@cache:6380/1" in text

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(_row(0, store="redis://:hunter2@h:1/0"))
    assert "hunter2" not in log.path.read_text() and log.read()[0]["store"] == "redis://:***@h:1/0"


def test_the_out_of_domain_metric_is_drawn_beside_the_held_out_reward():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from controller.run_log import _plot_ood

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
