"""One driver process of test_driver_killed.py (a separate process, so that it can be killed outright):

    python tests/faults/driver_process.py OUTPUT STORE_URL WEIGHTS ITERATIONS GROUPS [--resume]

The real driver (`controller.driver.train`), learner, reward server and Redis store; simulated rollout
workers (a fixed compute time, valid pocket-sized groups) and the fixed-cost stand-in reward."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, as `python -m` would

from controller.config import load_config  # noqa: E402
from controller.driver import train  # noqa: E402
from rollout_workers.simulated import FIXED_COST_REWARD, SimulatedRolloutWorker, preset_geometry  # noqa: E402


def overrides(store_url: str, weights: str, iterations: int, groups: int) -> list[str]:
    return [
        f"run.iterations={iterations}", "run.checkpoint_every=2", "run.eval_every=0", "run.eval_prompts_limit=1",
        f"algorithm.groups_per_iteration={groups}", "algorithm.group_size=4", "algorithm.anchors_per_group=2",
        "algorithm.updates_per_iteration=1", "lora.rank=2", "lora.alpha=4", f"policy.transformer_checkpoint={weights}",
        "rollout.num_workers=1", "rollout.num_cpus_per_worker=0.5", f"reward.model='{FIXED_COST_REWARD}'",
        "reward.num_actors=1", "reward.batch_size=4", "reward.timeout_s=60", f"replay.url='{store_url}'",
    ]


def main(argv: list[str]) -> int:
    output, store_url, weights, iterations, groups = argv[:5]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(None, overrides(store_url, weights, int(iterations), int(groups)))
    rows = train(config, Path(output), resume="--resume" in argv, worker_cls=SimulatedRolloutWorker,
                 worker_kwargs={"compute_s": 0.05, "geometry": preset_geometry("pocket")})
    print(f"driver done: {len(rows)} rows", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
