"""The streaming worker: Kafka in, micro-batched BERT inference, labels out (``python -m worker.run``)."""
