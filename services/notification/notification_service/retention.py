"""How long this service remembers events, and what it then forgets.

Every row here exists to keep an event's handling idempotent or in order: a
notification's (event, kind) claim stops a redelivered event from sending
its email again, and a reminder's version stops a late, older event from
undoing a newer one. They are needed only while the events they guard can
still arrive. So the consumer refuses events older than the retention
(``ExpiredEvent``: to the dead-letter queue, for a person to look at), and
these jobs (run by mesh_common's pruner) delete rows older than that, plus a
margin for the clocks of the instances that stamped the events.

Kept whatever their age: a reminder still to be sent, and one whose todo was
completed while its due date is ahead (reopening the todo must not send the
reminder a second time).
"""

from __future__ import annotations

from mesh_common.pruning import DAY, PruneJob

# An event stamped by an instance whose clock runs ahead must still find the
# rows it needs when it arrives just inside the retention.
CLOCK_MARGIN = DAY


def prune_jobs(retention: int) -> list[PruneJob]:
    keep = {"secs": retention + CLOCK_MARGIN}
    return [
        PruneJob(
            "notifications",
            # claimed_at: when the event was first handled, so never before it happened.
            "DELETE FROM notifications WHERE ctid = ANY(ARRAY("
            " SELECT ctid FROM notifications WHERE claimed_at < now() - make_interval(secs => %(secs)s)"
            " LIMIT %(batch)s))",
            keep,
        ),
        PruneJob(
            "reminders",
            "DELETE FROM reminders WHERE ctid = ANY(ARRAY("
            " SELECT ctid FROM reminders WHERE event_at < now() - make_interval(secs => %(secs)s)"
            " AND (todo_deleted OR due_at IS NULL OR due_at < now() - make_interval(secs => %(secs)s))"
            " LIMIT %(batch)s))",
            keep,
        ),
    ]
