"""The reward's bad-input error: one base for every error that means "this input cannot be used".

Checklists, weights, media, training data, models and backends each raise their own subclass, whose
message names the file, key or sample. ``reward`` (and ``mpo``, for the reward it builds) catch this
base and end with that one line and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RewardInputError(ValueError):
    """Input the reward cannot use (a file, key, model or sample); the message names it."""
