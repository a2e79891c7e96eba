"""resfuse.fuse(model): placeholder replaced by the fuse() implementation (issue 7)."""
from __future__ import annotations


def fuse(model, backend="auto", inplace=False, verify=False):
    raise NotImplementedError


def unfuse(model):
    raise NotImplementedError


def explain_model(model) -> str:
    raise NotImplementedError
