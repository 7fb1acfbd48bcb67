"""Registers `videoalign`: the VideoAlign (VideoReward) VQ/MQ/TA reward model."""

from reward_service.registry import register_reward


@register_reward("videoalign", heads=("VQ", "MQ", "TA"))  # reward_service.videoalign.HEADS, declared without importing it
def build_videoalign(**config):
    """Config: see `reward_service.videoalign.VideoAlignReward` (checkpoint_dir, base_model_dir, ...)."""
    from reward_service.videoalign import VideoAlignReward

    return VideoAlignReward(**config)
