"""Reward models behind one interface, their registry, the Ray actor pool and multi-reward weighting.

Importing this package stays light (no Ray, torch or transformers): import `reward_service.pool`
for the actor pool and `reward_service.videoalign` for the VideoAlign model.
"""

from reward_service.base import RewardModel, Video
from reward_service.registry import available_rewards, build_reward, register_reward
from reward_service.result import RewardResult

__all__ = ["RewardModel", "RewardResult", "Video", "available_rewards", "build_reward", "register_reward"]
