"""Named crash points for the crash-safety tests; off in production.

A writer that must survive a crash at any step calls :func:`point` between its steps.
Nothing happens unless the environment variable ``MODELCTL_FAULT_POINT`` names that very
point, which only a test sets (on a subprocess it then inspects): the process then ends
at once with ``os._exit(FAULT_EXIT_CODE)``, with no cleanup, no ``finally`` blocks, no
flush, as a kill or a power cut would leave it.

Points (each a ``<writer>.<step>`` name):

==================================  ==========================================================
``store.lineage_published``         model store: the sidecar ``<v>.json`` is in place, the ``.mar`` not yet
``store.archive_published``         model store: ``<v>.mar`` linked, its directory not yet fsynced
``train.archive_written``           trainer: the archive is in the store, ``result.json`` not yet written
``deploy.intent_recorded``          deployer: history intent committed, ``deployment.json`` not yet written
``deploy.desired_written``          deployer: ``deployment.json`` written, the intent not yet marked done
``rollback.intent_recorded``        the same two steps of a rollback
``rollback.desired_written``
``token.temp_written``              ``api_token``: its temporary file written, not yet published
``atomic.temp_written:<file name>`` any :func:`service.atomic.atomic_write`: the temp file fsynced, not renamed
==================================  ==========================================================
"""

from __future__ import annotations

import os
import sys

FAULT_ENV = "MODELCTL_FAULT_POINT"
#: The exit status of a process ended at a fault point.
FAULT_EXIT_CODE = 86


def point(name: str) -> None:
    """End the process here if ``MODELCTL_FAULT_POINT`` is ``name`` (tests only)."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted and wanted == name:
        try:
            sys.stderr.write(f"fault point {name}: exiting with {FAULT_EXIT_CODE}\n")
            sys.stderr.flush()
        finally:
            os._exit(FAULT_EXIT_CODE)
