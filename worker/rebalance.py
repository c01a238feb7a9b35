"""Rebalance handling: the worker is its consumer's group listener (``bert_stream.kafka.GroupListener``).

What a hand-over guarantees: before partitions go, the batches the model holds are published and what the
broker acknowledged is committed (under exactly-once, the open transaction commits; a member the group
already dropped aborts it instead, since its offsets could overwrite the new owner's). What was polled but
not started for a revoked partition is dropped, and whoever owns the partition next, this worker included,
reads it again from the committed offset. Added partitions start at the group's committed offset (the
client adapter sees to it).

:class:`Rebalancing` is a mixin of :class:`worker.loop.Worker`: the listener's calls come from inside
``consumer.poll`` on the loop's own thread, so they use the loop's state (batcher, offset tracker, delivery)
without locks.
"""

from __future__ import annotations

from bert_stream.kafka.interface import topic_partition
from bert_stream.logs import get_logger

log = get_logger("worker.rebalance")


class Rebalancing:
    """The three listener calls. The host class (:class:`worker.loop.Worker`) provides the loop's state,
    ``_revoking`` (offsets handed to the consumer to commit), ``_closing`` (set before the clients close: the
    listener then does nothing), and ``_publish``, ``_acknowledged``, ``_commit`` and ``_abort``."""

    def on_assigned(self, partitions: set) -> None:
        """Partitions assigned (all of them, or the ones added: cooperative protocols; the log line names
        what is owned now). Each starts at the group's committed offset; the adapter sees to it."""
        if self._closing:
            return
        owned = self.consumer.assignment()
        self.health.assigned = len(owned)
        self.metrics.rebalances.labels("assigned").inc()
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in owned),
                 added=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))

    def on_revoking(self, partitions: set, lost: bool) -> dict:
        """Before partitions go: publish what the model holds, then commit it. Under exactly-once the
        transaction commits here (on the producer's side: allowed inside a rebalance), and a member the group
        already dropped (``lost``: no valid generation to fence its offsets with) aborts instead, so nothing
        more of those partitions commits. Under at-least-once the offsets are returned for the consumer to
        commit. A model that does not finish within ``inference_stall_s`` ends the worker (the partitions'
        next owner re-reads what was not committed)."""
        self._revoking = {}
        if self._closing or not partitions:
            return {}
        if lost and self.delivery.transactional:
            self._abort("the group dropped this member: nothing more of its partitions may commit")
            return {}
        self._publish(self.classifier.drain(self.settings.inference_stall_s))
        offsets = self._acknowledged()
        if self.delivery.transactional:
            self._commit(offsets)
            return {}
        self._revoking = offsets
        return offsets

    def on_revoked(self, partitions: set, commit_error: Exception | None) -> None:
        """Drop what was not started for the revoked partitions: whoever owns them next (this worker too)
        reads it again from the committed offset."""
        if self._closing:
            return
        offsets, self._revoking = self._revoking, {}
        if commit_error is not None:  # membership already lost: the next owner re-reads from the last commit
            self.metrics.commits.labels("failed").inc()
            log.warning("revocation_commit_failed", error=str(commit_error)[:300])
        elif offsets:
            self.tracker.mark_committed(offsets)
            self.metrics.commits.labels("ok").inc()
        if not partitions:
            return
        dropped = self.batcher.drop(lambda job: topic_partition(job.message.source.topic, job.message.source.partition)
                                    in partitions)
        self.tracker.revoke(partitions)
        self.health.assigned = len(self.consumer.assignment() - partitions)
        self.metrics.rebalances.labels("revoked").inc()
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions),
                 dropped=len(dropped))
