"""The members' trainer for callers above the stages (the pipeline): ``pool.train_members``
with ``stages.train_tracked`` bound in. The workers live in ``pool``, which takes the training
callable and so sits below the stages; this module sits above them."""

from __future__ import annotations

from pairnet import pool
from pairnet.pool import Member, check_jobs, member_device, report_failures, usable_cpus
from pairnet.stages import train_tracked

__all__ = ["Member", "check_jobs", "member_device", "report_failures", "train_members", "usable_cpus"]


def train_members(members: list[Member], jobs: int, **kw) -> list[dict]:
    """``pool.train_members`` training each member with ``stages.train_tracked``."""
    return pool.train_members(members, jobs, train=train_tracked, **kw)
