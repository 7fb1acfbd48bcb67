"""Reproductions of the AR-CoPO paper's experiments on the pocket world, one command per table.

    python -m experiments.run fig2|fig6|table2|table3|nft|all [--seeds N] [--budget small|full] [--out results/]

Every command trains through the real driver (`controller.driver.train`: rollout workers, reward pool,
learner actor, replay store on Ray), evaluates the trained adapters on the held-out prompts in one
process, and writes its section of `results/experiments.md` plus PNG plots (docs/experiments.md).
"""
