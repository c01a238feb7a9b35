"""The product benchmark (``make bench``): the worker's throughput, latency and ceilings, in one run."""
