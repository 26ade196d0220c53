"""Executors run one attempt of a task and report its outcome; the dispatcher owns the rest."""

from .base import Execution, Executor, Invocation, Outcome, Placement
from .command import CommandExecutor
from .function_users import FunctionUsers
from .kubernetes_jobs import JobExecutor
from .server import ServerExecutor
from .warm_pods import WarmPodExecutor

__all__ = [
    "CommandExecutor",
    "Execution",
    "Executor",
    "FunctionUsers",
    "Invocation",
    "JobExecutor",
    "Outcome",
    "Placement",
    "ServerExecutor",
    "WarmPodExecutor",
]
