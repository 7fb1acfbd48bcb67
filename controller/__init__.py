"""The single controller: the driver loop (`controller.driver`, started as `python -m learner.main`),
the system of actors it starts (rollout fleet, reward pool, learner), scaling, metrics, run records,
evaluation, merge and export. Nothing heavy runs here; actors own their resources."""
