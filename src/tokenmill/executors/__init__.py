"""Executors run a function over shards; steps never know which executor runs them."""

from tokenmill.executors.local import LocalExecutor

__all__ = ["LocalExecutor"]
