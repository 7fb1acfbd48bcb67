"""Starting Ray for a run: attach to the cluster RAY_ADDRESS names, or start a local one with its
dashboard on 127.0.0.1. Both URLs are printed: the dashboard (actors, tasks, logs, and the project's
metrics on its Metrics page once Prometheus and Grafana are set up) and the node's Prometheus
endpoint, which serves the run's `ray_arcopo_*` series as they are recorded."""

from __future__ import annotations

import logging
import os

import numpy as np
import ray

log = logging.getLogger(__name__)


def init_ray(num_cpus_needed: float, dashboard_port: int | None = 8265) -> str | None:
    """Attach to the cluster RAY_ADDRESS names (as inside `ray job submit`), else start a local one
    with enough CPU slots for every actor (oversubscribing a small machine on purpose). Returns the
    dashboard's URL, or None where there is none (Ray already running, a cluster's own dashboard,
    `dashboard_port` None, or a dashboard that could not start: the run goes on without it)."""
    if ray.is_initialized():
        return None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        have = ray.cluster_resources().get("CPU", 0.0)
        if have < num_cpus_needed:  # not an error: an autoscaler may still add nodes
            log.warning(
                "the Ray cluster has %g CPU slots but this run's actors ask for %g (rollout.num_workers x "
                "rollout.num_cpus_per_worker + reward.num_actors + 1 for the learner); they wait until the "
                "cluster has them. Start the head with `ray start --num-cpus %d` or lower rollout.num_workers "
                "/ rollout.num_cpus_per_worker.", have, num_cpus_needed, int(np.ceil(num_cpus_needed)),
            )
        return None
    num_cpus = max(int(np.ceil(num_cpus_needed)), os.cpu_count() or 1)
    if dashboard_port is not None:
        try:
            context = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                               dashboard_port=dashboard_port)
        except Exception as err:  # e.g. the port is taken, or the dashboard's packages are missing
            log.warning("the Ray dashboard could not start (%s); the run goes on without it "
                        "(set run.dashboard_port to a free port, or null to not ask for one)", err)
            if ray.is_initialized():
                ray.shutdown()
        else:
            url = f"http://{context.dashboard_url}" if context.dashboard_url else None
            if url:
                print(f"Ray dashboard: {url}", flush=True)
            else:
                log.warning("Ray started without its dashboard (its packages are missing?); the run goes on")
            _print_metrics_url()
            return url
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    _print_metrics_url()
    return None


def _print_metrics_url() -> None:
    """The node's Prometheus endpoint, where the run's `ray_arcopo_*` series are (the dashboard's
    Metrics page draws them once Prometheus and Grafana scrape it: deploy/grafana/)."""
    port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
    if port:
        print(f"Prometheus metrics (ray_arcopo_*): http://127.0.0.1:{port}/metrics", flush=True)
