"""Executors run one attempt of a task and report its outcome; the dispatcher owns the rest."""

from .base import Execution, Executor, Invocation, Outcome
from .command import CommandExecutor
from .server import ServerExecutor

__all__ = ["CommandExecutor", "Execution", "Executor", "Invocation", "Outcome", "ServerExecutor"]
