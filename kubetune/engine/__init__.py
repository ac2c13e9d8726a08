"""The engine: an experiment's control loop, shared by the local runner and the operator."""

from .engine import Completion, Engine, Launch, Stop, check_end, goes_on, judge_exit

__all__ = ["Completion", "Engine", "Launch", "Stop", "check_end", "goes_on", "judge_exit"]
