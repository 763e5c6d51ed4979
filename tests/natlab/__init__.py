"""The NAT lab: a fake internet of network namespaces and nftables NATs (see docs/natlab.md)."""

from .lab import (
    NAT_TYPES,
    Host,
    LabProcess,
    NatLab,
    NatLabError,
    NatType,
    Router,
    cleanup_stale_namespaces,
    missing_requirements,
    wait_until,
)

__all__ = [
    "NAT_TYPES",
    "Host",
    "LabProcess",
    "NatLab",
    "NatLabError",
    "NatType",
    "Router",
    "cleanup_stale_namespaces",
    "missing_requirements",
    "wait_until",
]
