"""The metric bus between trials and the scheduler (in-memory or Redis Streams)."""

from .base import GROUP, Message, MetricBus, Report, address, experiment_key, number_of
from .client import TrialClient
from .memory import MemoryBus
from .service import SchedulerLoop, StudyHandler


def redis_bus(**kw):
    """A RedisBus (imported lazily: redis-py is only needed for it)."""
    from .redis_streams import RedisBus

    return RedisBus(**kw)


__all__ = ["GROUP", "Message", "MetricBus", "Report", "address", "experiment_key", "number_of", "TrialClient",
           "MemoryBus", "SchedulerLoop", "StudyHandler", "redis_bus"]
