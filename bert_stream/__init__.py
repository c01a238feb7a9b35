"""Shared plumbing for bert-stream's programs: logging, settings, Kafka client construction."""
