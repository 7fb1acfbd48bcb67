"""Small real reward models for the pool tests, registered as "toy_rewards:<name>".

Behaviour is driven by markers in the prompt, so a test decides per sample:
  "sleep=<seconds>"    the brightness reward sleeps that long for the sample
  "RAISE"              toy_raising raises for the whole batch holding the sample
  "NAN"                toy_nan returns NaN for the sample
  "CRASH"              toy_crash_once kills its process (os._exit) if its flag file exists,
                       removing the file first so it happens once; "HANG" sleeps 60 s instead
"""

from __future__ import annotations

import os
import re
import time

import numpy as np

from reward_service.base import RewardModel, Video
from reward_service.registry import register_reward


def brightness(video: Video) -> np.ndarray:
    """Mean of each colour channel over all frames and pixels, in [0, 1]."""
    return video.frames.reshape(-1, 3).mean(axis=0) / 255.0


class BrightnessReward(RewardModel):
    name = "toy_brightness"
    heads = ("R", "G", "B")

    def score(self, videos: list[Video], prompts: list[str]) -> dict[str, np.ndarray]:
        values = []
        for video, prompt in zip(videos, prompts):
            if match := re.search(r"sleep=([0-9.]+)", prompt):
                time.sleep(float(match[1]))
            values.append(brightness(video))
        arr = np.array(values).reshape(len(videos), 3)
        return {h: arr[:, k] for k, h in enumerate(self.heads)}


class RaisingReward(RewardModel):
    name = "toy_raising"
    heads = ("ok",)

    def score(self, videos, prompts):
        if any("RAISE" in p for p in prompts):
            raise ValueError("marked sample in the batch")
        return {"ok": np.ones(len(videos))}


class NanReward(RewardModel):
    name = "toy_nan"
    heads = ("peak",)

    def score(self, videos, prompts):
        return {"peak": np.array([np.nan if "NAN" in p else v.frames.max() / 255.0 for v, p in zip(videos, prompts)])}


class CrashOnceReward(RewardModel):
    name = "toy_crash_once"
    heads = ("alive",)

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def score(self, videos, prompts):
        for p in prompts:
            if ("CRASH" in p or "HANG" in p) and _take(self.flag):
                if "CRASH" in p:
                    os._exit(1)
                time.sleep(60)
        return {"alive": np.ones(len(videos))}


def _take(flag: str) -> bool:
    try:
        os.remove(flag)
        return True
    except FileNotFoundError:
        return False


register_reward("toy_brightness")(BrightnessReward)
register_reward("toy_raising")(RaisingReward)
register_reward("toy_nan")(NanReward)
register_reward("toy_crash_once")(CrashOnceReward)
