"""Seeds derived from a run's seed, so that every random draw is a pure function of (run seed, where it happens):
resuming needs no generator state, and one draw does not shift another."""

import hashlib


def seed_from_labels(seed: int, *labels) -> int:
    """A 63-bit seed from a base seed and any labels (SHA-256 of their repr: stable across processes, unlike
    hash()). critique.py: one per prompt record and per generation step."""
    digest = hashlib.sha256(repr((seed, *labels)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def iteration_seed(seed: int, iteration: int, stream: int) -> int:
    """A distinct 63-bit seed for each (run seed, iteration, purpose) triple, by arithmetic (stream < 16).
    ppo.py: prompt order, sampling, minibatches, the rollout mix."""
    return ((seed * 1_000_003 + iteration) * 16 + stream) % (2**63 - 1)
