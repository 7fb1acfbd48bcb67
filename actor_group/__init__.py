"""An elastic group of restartable Ray actors: start, resize, drain, replace, probe, poll.

It sits at the bottom of the layers, depending only on Ray, because two packages that may not import
each other need it: the controller's rollout fleet and the reward service's actor pool
(`reward_service` must stay independent of everything above `policy`).
"""

from actor_group.group import ActorGroup, Member, wait_any

__all__ = ["ActorGroup", "Member", "wait_any"]
