"""What an operator may do to a study: analyse it again, or send its results to the PACS again.

Both write only through the owning modules (``appliance.lifecycle.studies`` for the state,
``appliance.delivery.export`` for the export queue) and record an audit entry (``appliance.core.audit``) in
the same transaction, so the action and its trail commit together or not at all. Neither needs the daemon's
objects: the pipeline worker picks up ``complete`` studies and the exporter due export rows by polling the
database (``pipeline.poll_s``), so both work from the CLI while the daemon runs, and take effect at its next
start when it does not.

A refusal raises a :class:`Refused` (a ``ValueError``) whose message says why, for people; nothing is written.
"""

from __future__ import annotations

from appliance.core.audit import AuditEvent, record_event
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store, now
from appliance.delivery import export
from appliance.lifecycle import studies
from appliance.pipeline.results import queue_unqueued_objects
from appliance.worklist.read import StudyNotFound

log = get_logger(__name__)


class Refused(ValueError):
    """The action cannot be done on this study now; the message says why (for people)."""


_WHY_NOT_RETRY = {
    studies.RECEIVED: "it is still receiving images (it is analysed once complete)",
    studies.COMPLETE: "it is already waiting to be analysed",
    studies.INFERRING: "it is being analysed now",
    studies.SUPERSEDED: "a later revision of the study replaced it",
    studies.PURGED: "its images were purged by retention",
}


def retry_analysis(store: Store, settings: Settings, study_id: int, *, actor: str) -> str:
    """Send an analysed or ended study (``lifecycle.studies.REOPENABLE_STATES``: inferred, exported,
    no_model, not_processable, failed) back to analysis: ``-> complete`` with its attempts reset
    (:func:`appliance.lifecycle.studies.reopen`), and audit ``study_retry`` with ``actor``. Returns the new
    state (``complete``). The same bundle versions give the same result UIDs, so a re-run replaces rather
    than duplicates; what the PACS already acknowledged is not sent again (:func:`resend_to_pacs` does that).

    Raises :class:`~appliance.worklist.read.StudyNotFound` for an unknown id, :class:`Refused` when the
    study is receiving, queued, being analysed, superseded or purged. (``settings`` is not consulted: the
    worker applies its own ``pipeline.max_attempts`` to the reopened study.)
    """
    with store.transaction() as conn:
        st = studies.get(conn, study_id)
        if st is None:
            raise StudyNotFound(f"no study with id {study_id}")
        if st.state not in studies.REOPENABLE_STATES:
            why = _WHY_NOT_RETRY.get(st.state, f"it is {st.state}")
            raise Refused(f"study {study_id} cannot be analysed again: {why}")
        studies.reopen(conn, study_id, f"retry requested by {actor} (was {st.state})")
        record_event(
            store,
            AuditEvent.STUDY_RETRY,
            actor=actor,
            subject=f"study:{study_id}",
            detail={"from_state": st.state, "revision": st.revision},
        )
    log.info("study reopened for analysis", study_id=study_id, was=st.state, actor=actor)
    return studies.COMPLETE


def resend_to_pacs(store: Store, settings: Settings, study_id: int, *, actor: str) -> int:
    """Queue every result object of the study for export again, to every PACS destination configured now:
    rows already queued go back to pending with no attempts (``delivery.export.requeue_study``; an
    ``exported`` study goes back to ``inferred`` until they are acknowledged), destinations added since are
    queued too (``pipeline.results.queue_unqueued_objects`` -> ``delivery.export.queue_object``). Audits
    ``study_resend``. Returns how many result objects were queued (each for every destination).

    Raises :class:`~appliance.worklist.read.StudyNotFound` for an unknown id, :class:`Refused` when no PACS
    destination is configured or the study has no result objects (not analysed yet, no model, or purged).
    """
    if not settings.pipeline.destinations:
        raise Refused("no PACS destination is configured (pipeline.destinations): nothing to send to")
    with store.transaction() as conn:
        st = studies.get(conn, study_id)
        if st is None:
            raise StudyNotFound(f"no study with id {study_id}")
        objects = int(
            conn.execute(
                "SELECT COUNT(*) FROM result_objects o JOIN results r ON r.id=o.result_id WHERE r.study_id=?",
                (study_id,),
            ).fetchone()[0]
        )
        if st.state == studies.PURGED or objects == 0:
            why = (
                "its results were purged by retention"
                if st.state == studies.PURGED
                else f"it has no results ({st.state})"
            )
            raise Refused(f"study {study_id} has nothing to send: {why}")
        added = queue_unqueued_objects(conn, settings, study_id)
        rows = export.requeue_study(conn, study_id, now())
        record_event(
            store,
            AuditEvent.STUDY_RESEND,
            actor=actor,
            subject=f"study:{study_id}",
            detail={
                "objects": objects,
                "export_rows": rows,
                "new_rows": added,
                "destinations": [d.name for d in settings.pipeline.destinations],
            },
        )
    log.info("study results re-queued for export", study_id=study_id, objects=objects, rows=rows, actor=actor)
    return objects
