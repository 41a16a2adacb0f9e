"""User reward functions for the training tests (imported by path, `reward_fixtures:name`)."""

from __future__ import annotations

import time


def always_zero(responses, answers):
    return [0.0 for _ in responses]


def always_one(responses, answers):
    return [1.0 for _ in responses]


def raises(responses, answers):
    raise RuntimeError("this reward function is broken")


def hangs(responses, answers):
    time.sleep(3600)
    return [0.0 for _ in responses]


def parity(responses, answers):
    """1.0 for responses of even length: varied rewards within a group, whatever the model."""
    return [float(len(r) % 2 == 0) for r in responses]
