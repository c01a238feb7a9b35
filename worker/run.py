"""``python -m worker.run``: consume Chinese messages, micro-batch them through the model, publish labels.

The command line: parses the settings, starts one worker process (the loop: :mod:`worker.loop`) or several
sharing the device (:mod:`worker.processes`), and turns SIGTERM/SIGINT into a graceful stop: finish and
publish what is held, commit, exit 0. A second signal exits at once (status 1; nothing committed is lost,
the uncommitted rest is read again by the partitions' next owner).
"""

from __future__ import annotations

import os
import signal
import sys

from bert_stream.logs import bind_process, configure_logging, get_logger
from bert_stream.settings import parse_settings
from worker.loop import Worker
from worker.settings import WorkerSettings

log = get_logger("worker.run")


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(WorkerSettings, argv, prog="python -m worker.run", description=__doc__.split("\n")[0])
    configure_logging(settings.log_level)
    if settings.processes > 1:
        from worker import processes

        return processes.supervise(settings, list(sys.argv[1:] if argv is None else argv))
    if os.environ.get("BERT_STREAM_PROCESS_INDEX"):  # one of several (worker.processes): which, on every line
        bind_process(process=int(os.environ["BERT_STREAM_PROCESS_INDEX"]))
    worker = Worker(settings, freeze_heap=True)

    def on_signal(signum, _frame):
        if worker.stop.is_set():
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal_received", signal=signal.Signals(signum).name, action="finishing the batch, then exit")
        worker.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return worker.run()  # logs its own failure (worker_failed) and returns 1
    except Exception:  # closing the clients failed after that: logged as what it is, status 1
        log.exception("worker_cleanup_failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
