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
    # Ray Train's print patch both tees and logs each print: every progress line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # An embedded instance is for this machine only: every server on loopback (Ray
        # otherwise swaps 127.0.0.1 for the interface address, and binds 0.0.0.0). Ray's
        # processes read the switch from the environment; this one read it at import.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        constants = ray._private.ray_constants
        constants.ENABLE_RAY_CLUSTER = constants.env_bool(constants.ENABLE_RAY_CLUSTERS_ENV_VAR, True)
        ray.init(
            num_cpus=cfg.num_cpus or None,
            # No dashboard: on 2 cores it costs the data stage ~25% of its throughput.
            # Without it Ray Train's placement-group cleaner cannot reach the state API
            # and warns every few seconds; Ray's own logs are therefore kept to errors
            # (uniloom's progress lines are prints, not logs).
            include_dashboard=False,
            logging_config=ray.LoggingConfig(log_level="ERROR"),
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    return ray
