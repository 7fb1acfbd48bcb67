"""Registration files, one per reward: each registers a factory with `register_reward(name)`.

The registry imports `reward_service.rewards.<name>` when `build_reward(name)` is first called, so a
file here must stay light at import time: heavy imports (torch models, transformers) belong inside
its factory.
"""
