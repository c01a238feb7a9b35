"""``make demo`` / ``python -m demo``: one command that shows the whole product working on real Chinese
news titles: local broker + Redis, a trained checkpoint, a worker, results with accuracy and latency, the
cache, the dead-letter topic, and a hot model reload. See ``demo/__main__.py`` for the story it tells."""
