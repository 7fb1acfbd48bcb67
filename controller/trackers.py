"""Experiment trackers: where a run's metrics, config, sample videos and reward curve go.

`run.trackers` picks them (controller/config.py): `jsonl` (metrics.jsonl, always on), `tensorboard`
(event files under `<output>/tensorboard`), `mlflow` (a file store under `<output>/mlruns`, or
`run.mlflow_tracking_uri`) and `wandb` (offline under `<output>/wandb` unless `run.wandb_mode=online`).

The driver makes one call per iteration, `Trackers.log_iteration(row, media)`; every tracker gets
the same row (step = the row's iteration) and the same media. No tracker can stop a run: an error
in one is logged and that tracker is disabled for the rest of the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from controller.config import Config, redact_secrets
from controller.run_log import MetricsLog

log = logging.getLogger(__name__)
TRACKER_RUNS_FILE = "tracker_runs.json"


@dataclass(frozen=True)
class Media:
    """A file for the trackers: a held-out sample grid (MP4) or an image (PNG)."""

    kind: Literal["video", "image"]
    tag: str
    path: Path
    fps: float = 8.0


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a metrics row, as floats (null/NaN entries are left out)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "iteration":
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def flat_config(config: Config) -> dict[str, str | int | float | bool]:
    """The config as hyper-parameters: dotted keys, scalar values (lists, dicts and None as text),
    passwords inside URLs redacted as in config.yaml."""
    out = {}
    for section, fields in config.model_dump(mode="json").items():
        for key, value in fields.items():
            scalar = isinstance(value, (int, float, bool))
            out[f"{section}.{key}"] = value if scalar else redact_secrets(str(value))
    return out


class Tracker:
    name = "tracker"

    def log_config(self, params: dict[str, Any], text: str) -> None:
        pass

    def log_row(self, row: dict[str, Any], step: int) -> None:
        pass

    def log_media(self, media: Media, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker(Tracker):
    name = "jsonl"

    def __init__(self, metrics_log: MetricsLog):
        self.metrics_log = metrics_log

    def log_row(self, row, step):
        self.metrics_log.append(row)


class TensorBoardTracker(Tracker):
    """Scalars under the metrics.jsonl column names; the config in the HParams and Text tabs; sample
    videos as animated GIFs in the Images tab (TensorBoard's way of showing video)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_config(self, params, text):
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + text + "\n```")
        self.writer.flush()

    def log_row(self, row, step):
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_media(self, media, step):
        import imageio.v3 as iio
        from tensorboard.compat.proto.summary_pb2 import Summary

        frames = iio.imread(media.path)
        if media.kind == "image":
            self.writer.add_image(media.tag, frames[..., :3], step, dataformats="HWC")
        else:
            gif = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000.0 / media.fps, loop=0)
            image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=gif)
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=media.tag, image=image)]), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run per training run: metrics with the iteration as step, the config as params,
    media as artifacts under their tag."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None):
        if tracking_uri.startswith("file:"):
            # MLflow 3 keeps its file store only behind this opt-in; a local file store needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self._param = Metric, Param
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:  # a resumed training run goes on in its MLflow run
            self.run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_config(self, params, text):
        items = [self._param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_text(self.run_id, text, "config.yaml")

    def log_row(self, row, step):
        import time

        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, step) for k, v in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_media(self, media, step):
        self.client.log_artifact(self.run_id, str(media.path), artifact_path=media.tag)

    def close(self):
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, directory: Path, project: str, mode: str, run_name: str, config: dict[str, Any],
                 run_id: str | None = None):
        import wandb

        self._wandb = wandb
        directory.mkdir(parents=True, exist_ok=True)
        # A resumed training run goes on under its W&B run id (offline: `wandb sync` joins the parts).
        self.run = wandb.init(project=project, mode=mode, dir=str(directory), name=run_name, config=config,
                              id=run_id, resume="allow" if run_id else None, reinit="create_new")
        self.run_id = self.run.id

    def log_row(self, row, step):
        self.run.log(scalars(row), step=step)

    def log_media(self, media, step):
        wandb = self._wandb
        value = wandb.Video(str(media.path), format="mp4") if media.kind == "video" else wandb.Image(str(media.path))
        self.run.log({media.tag: value}, step=step)

    def close(self):
        self.run.finish()


class Trackers:
    """The fan-out: every call goes to each live tracker; a tracker that raises is logged and dropped."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)
        self.disabled: dict[str, str] = {}  # tracker name -> the error that disabled it

    @classmethod
    def open(cls, config: Config, output: Path, metrics_log: MetricsLog, resume: bool = False) -> "Trackers":
        """The trackers `run.trackers` names; one that cannot start is logged and left out. The MLflow
        and W&B run ids go to `<output>/tracker_runs.json`, so that `resume` continues those runs."""
        run, ids_file = config.run, output / TRACKER_RUNS_FILE
        ids = json.loads(ids_file.read_text()) if resume and ids_file.is_file() else {}
        makers = {
            "jsonl": lambda: JsonlTracker(metrics_log),
            "tensorboard": lambda: TensorBoardTracker(output / "tensorboard"),
            "mlflow": lambda: MlflowTracker(run.mlflow_tracking_uri or (output / "mlruns").resolve().as_uri(),
                                            run.mlflow_experiment, output.name, ids.get("mlflow")),
            "wandb": lambda: WandbTracker(output, run.wandb_project, run.wandb_mode, output.name,
                                          config.model_dump(mode="json"), ids.get("wandb")),
        }
        trackers, failed = [], {}
        for name in run.trackers:
            try:
                trackers.append(makers[name]())
            except Exception as err:  # an uninstalled package, an unreachable tracking server, ...
                log.error("tracker %s could not start and is disabled for this run: %s", name, _describe(err))
                failed[name] = _describe(err)
        ids.update({t.name: t.run_id for t in trackers if getattr(t, "run_id", None)})
        if ids:
            ids_file.write_text(json.dumps(ids) + "\n")
        fanout = cls(trackers)
        fanout.disabled.update(failed)
        return fanout

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log_config(self, config: Config, text: str) -> None:
        self._each("log_config", flat_config(config), text)

    def log_iteration(self, row: dict[str, Any], media: list[Media] = ()) -> None:
        """One iteration's metrics row and the files made during it (samples, plots), at step `row["iteration"]`."""
        self._each("log_row", row, int(row["iteration"]))
        self.log_media(media, int(row["iteration"]))

    def log_media(self, media: list[Media], step: int) -> None:
        for item in media:
            self._each("log_media", item, step)

    def close(self) -> None:
        self._each("close")

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:
                log.error("tracker %s failed in %s and is disabled for the rest of the run: %s",
                          tracker.name, method, _describe(err), exc_info=True)
                self.trackers.remove(tracker)
                self.disabled[tracker.name] = _describe(err)


def _describe(err: Exception) -> str:
    if isinstance(err, ImportError):
        return f"{err} (install the pinned versions: pip install -e .)"
    return f"{type(err).__name__}: {err}"
