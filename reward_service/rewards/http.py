"""Registers `http`: a reward model behind HTTP (a reward server's scoring API or a chat-completions VLM judge)."""

from reward_service.registry import register_reward


@register_reward("http")
def build_http(**options):
    """Options: see `reward_service.http_reward.HttpRewardOptions` (url, dialect, heads, judge, ...)."""
    from reward_service.http_reward import HttpReward

    return HttpReward(**options)
