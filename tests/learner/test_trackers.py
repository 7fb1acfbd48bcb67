"""Each tracker read back with its own reader: TensorBoard's event reader, the MLflow client on the
file store, the records of the W&B offline run. And the fan-out: a failing tracker is disabled, the
others go on."""

from __future__ import annotations

import json
import logging
import struct
import time

import imageio.v3 as iio
import numpy as np
import pytest

from controller.config import load_config
from controller.run_log import MetricsLog, plot_reward_curves
from controller.trackers import Media, Tracker, Trackers, flat_config
from policy.video_io import grid_video

ROWS = [
    {"iteration": 0, "reward_mean": 1.5, "reward_VQ": 0.5, "loss": -0.25, "clip_fraction": 0.125, "policy_version": 1,
     "rollout_s": 2.0, "reward_s": 0.5, "update_s": 1.0, "broadcast_s": 0.01, "grad_norm": None},
    {"iteration": 1, "reward_mean": 1.75, "reward_VQ": 0.625, "loss": -0.5, "clip_fraction": 0.0, "policy_version": 2,
     "rollout_s": 2.5, "reward_s": 0.75, "update_s": 1.5, "broadcast_s": 0.02, "grad_norm": 0.3, "eval_reward_mean": 1.6},
]


def _media(tmp_path):
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8) for _ in range(2)]
    video = grid_video(videos, ["a prompt", "another"], tmp_path / "samples" / "iter.mp4", fps=8)
    curve = plot_reward_curves(ROWS, tmp_path / "reward_curve.png")
    return [Media("video", "heldout_samples", video, 8.0), Media("image", "reward_curve", curve)]


def _same_as_rows(key, pairs):
    """`pairs` (step, value) as a tracker stored them equal the rows' column `key` (float32 in TensorBoard)."""
    expected = [(r["iteration"], float(r[key])) for r in ROWS if r.get(key) is not None]
    assert [s for s, _ in pairs] == [s for s, _ in expected], key
    assert [v for _, v in pairs] == pytest.approx([v for _, v in expected], rel=1e-6), key


def _run_all(tmp_path, trackers):
    config = load_config(None, [f"run.trackers={trackers}", "run.iterations=2"])
    out = tmp_path / "run"
    out.mkdir()
    fanout = Trackers.open(config, out, MetricsLog(out / "metrics.jsonl"))
    fanout.log_config(config, "run:\n  iterations: 2\n")
    media = _media(tmp_path)
    fanout.log_iteration(ROWS[0], media[:1])
    fanout.log_iteration(ROWS[1], media)
    fanout.close()
    assert not fanout.disabled, fanout.disabled
    return config, out


RESUMED = {**ROWS[1], "iteration": 2, "reward_mean": 1.875, "policy_version": 3}


def _resume(out, trackers):
    """`--resume` into the same output: the trackers open again and log the next iteration."""
    config = load_config(None, [f"run.trackers={trackers}", "run.iterations=3"])
    fanout = Trackers.open(config, out, MetricsLog(out / "metrics.jsonl"), resume=True)
    fanout.log_iteration(RESUMED)
    fanout.close()
    assert not fanout.disabled, fanout.disabled


def test_tensorboard_holds_the_rows_config_video_and_curve(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    config, out = _run_all(tmp_path, "[jsonl, tensorboard]")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    for key in ("reward_mean", "reward_VQ", "loss", "clip_fraction", "policy_version", "reward_s", "grad_norm"):
        _same_as_rows(key, [(e.step, e.value) for e in events.Scalars(key)])
    assert "iteration" not in events.Tags()["scalars"]
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]["loss"] == -0.5

    videos = events.Images("heldout_samples")
    assert [v.step for v in videos] == [0, 1]
    gif = iio.imread(videos[0].encoded_image_string, extension=".gif")
    assert gif.shape[0] == 5 and (videos[0].width, videos[0].height) == (gif.shape[2], gif.shape[1])
    assert [i.step for i in events.Images("reward_curve")] == [1]

    hparams = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    logged = hparams.session_start_info.hparams
    assert logged["algorithm.learning_rate"].number_value == config.algorithm.learning_rate
    assert logged["run.trackers"].string_value == "['jsonl', 'tensorboard']"


def test_mlflow_file_store_holds_the_rows_config_and_media(tmp_path):
    from mlflow.tracking import MlflowClient

    config, out = _run_all(tmp_path, "[jsonl, mlflow]")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("arcopo").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for key in ("reward_mean", "reward_VQ", "loss", "reward_s", "grad_norm"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        _same_as_rows(key, history)
    assert run.data.params == {k: str(v) for k, v in flat_config(config).items()}
    listed = {a.path for d in ("heldout_samples", "reward_curve") for a in client.list_artifacts(run.info.run_id, d)}
    assert listed == {"heldout_samples/iter.mp4", "reward_curve/reward_curve.png"}
    config_copy = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert open(config_copy).read() == "run:\n  iterations: 2\n"

    _resume(out, "[jsonl, mlflow]")  # goes on in the same MLflow run
    (resumed,) = client.search_runs([run.info.experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward_mean")) == [
        (0, 1.5), (1, 1.75), (2, 1.875)]


def _wandb_records(path):
    """The records of a W&B transaction log (LevelDB log format: 32 KiB blocks of CRC32C-checked
    chunks after a 7-byte W&B header), as wandb's own protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL / FIRST start a record
        if kind in (1, 4):  # FULL / LAST end it
            records.append(pb.Record.FromString(pending))
    return records


def test_wandb_offline_run_holds_the_rows_config_and_media(tmp_path):
    config, out = _run_all(tmp_path, "[jsonl, wandb]")
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    # wandb's service process writes the log; run.finish() can return before the file is complete.
    deadline = time.monotonic() + 30
    while True:
        records = _wandb_records(next(run_dir.glob("run-*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {}
            for item in record.history.item:  # a key is either `key` or a path in `nested_key`
                *parents, leaf = list(item.nested_key) or [item.key]
                node = items
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = json.loads(item.value_json)
            history.setdefault(items["_step"], {}).update(items)
    for key in ("reward_mean", "reward_VQ", "loss", "reward_s", "grad_norm"):
        _same_as_rows(key, [(s, h[key]) for s, h in sorted(history.items()) if key in h])
    assert history[1]["heldout_samples"]["_type"] == "video-file"
    assert history[1]["reward_curve"]["_type"] == "image-file"
    assert len(list((run_dir / "files" / "media" / "videos").glob("*.mp4"))) == 2
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    logged = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert logged["algorithm"]["learning_rate"] == config.algorithm.learning_rate
    assert run_record.display_name == "run"

    time.sleep(1.1)  # W&B names an offline part by its start second: two parts in one second would share it
    _resume(out, "[jsonl, wandb]")  # a second offline part under the same run id, for `wandb sync`
    parts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith("-" + run_record.run_id) for p in parts)


class _Recorder(Tracker):
    name = "recorder"

    def __init__(self):
        self.rows = []

    def log_row(self, row, step):
        self.rows.append(step)


class _Broken(Tracker):
    name = "broken"

    def log_row(self, row, step):
        raise OSError("disk full")


def test_a_failing_tracker_is_logged_and_disabled_and_the_others_go_on(caplog):
    recorder = _Recorder()
    fanout = Trackers([_Broken(), recorder])
    with caplog.at_level(logging.ERROR, logger="controller.trackers"):
        for row in ROWS:
            fanout.log_iteration(row)
    assert recorder.rows == [0, 1] and fanout.names == ["recorder"]
    assert fanout.disabled == {"broken": "OSError: disk full"}
    assert caplog.text.count("tracker broken failed in log_row and is disabled") == 1


def test_a_tracker_that_cannot_start_is_left_out(tmp_path, caplog):
    config = load_config(None, ["run.trackers=[jsonl, mlflow]", "run.mlflow_tracking_uri=nosuchscheme://x"])
    with caplog.at_level(logging.ERROR, logger="controller.trackers"):
        fanout = Trackers.open(config, tmp_path, MetricsLog(tmp_path / "metrics.jsonl"))
    assert fanout.names == ["jsonl"] and set(fanout.disabled) == {"mlflow"}
    assert "tracker mlflow could not start" in caplog.text
    fanout.log_iteration(ROWS[0])
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["iteration"] == 0


def test_trackers_config_is_checked():
    from controller.config import ConfigError

    with pytest.raises(ConfigError, match="jsonl"):
        load_config(None, ["run.trackers=[tensorboard]"])
    with pytest.raises(ConfigError, match="run.trackers"):
        load_config(None, ["run.trackers=[jsonl, comet]"])


def test_config_hyper_parameters_carry_no_url_password():
    from controller.config import load_config
    from controller.trackers import flat_config

    config = load_config(None, ["replay.url=redis://:hunter2@10.0.0.5:6379/0"])
    params = flat_config(config)
    assert "hunter2" not in repr(params)
    assert params["replay.url"] == "redis://:***@10.0.0.5:6379/0"
