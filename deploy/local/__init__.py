"""Local broker + Redis processes for the tests, the demo and the benchmarks (``python -m deploy.local``)."""

from deploy.local.stack import BROKERS, DEFAULT_STATE_DIR, LocalStack, StackError

__all__ = ["BROKERS", "DEFAULT_STATE_DIR", "LocalStack", "StackError"]
