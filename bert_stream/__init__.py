"""What trainer and worker share: the checkpoint store, settings, logging, the n-gram half, Kafka."""
