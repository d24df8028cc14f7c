"""Disaggregated serving across processes: a frontend, prefill instances and decode
instances; KV handed over with ``jax.experimental.transfer``, control over ZeroMQ."""

from serve.cluster.config import ClusterConfig, DecodeSpec, PrefillSpec, load_cluster_config
from serve.cluster.frontend import ClusterScheduler, Handoff

__all__ = [
    "ClusterConfig",
    "ClusterScheduler",
    "DecodeSpec",
    "Handoff",
    "PrefillSpec",
    "load_cluster_config",
]
