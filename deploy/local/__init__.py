"""Local broker + Redis processes for the tests, the demo and the benchmarks (``python -m deploy.local``)."""

from deploy.local.errors import BrokerUnavailable, StackError
from deploy.local.stack import BROKERS, DEFAULT_BROKER, DEFAULT_STATE_DIR, LocalStack

__all__ = ["BROKERS", "DEFAULT_BROKER", "DEFAULT_STATE_DIR", "BrokerUnavailable", "LocalStack", "StackError"]
