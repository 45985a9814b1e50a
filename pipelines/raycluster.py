"""Connecting to Ray: the cluster named by `ray.address` or by RAY_ADDRESS (set for the
driver of a Ray Job), otherwise a local instance whose every server binds to loopback."""

from __future__ import annotations

import os

from uniloom.pipelines.config import RayConfig


def init_ray(cfg: RayConfig):
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus or None,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    return ray
