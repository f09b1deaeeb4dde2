"""The tracker run's identity, kept in the run directory so that a restart logs into the same run.

``<run>/wandb/run_id`` holds the wandb run id, made on the first ``init_trackers`` and read by every
later one (``resume="allow"``): a job killed at step 500 and restarted shows one run whose curves go
on from the last logged step, not two half runs. The file is written once, atomically, by the main
process (the only one that starts trackers).
"""

from __future__ import annotations

from mpo.store import RunDir, write_text

RUN_ID_FILE = "run_id"


def wandb_run_id(run: RunDir) -> str:
    """The run directory's wandb run id, made (and stored) on first use."""
    path = run.root / "wandb" / RUN_ID_FILE
    if path.exists():
        stored = path.read_text().strip()
        if stored:
            return stored
    import uuid

    new = uuid.uuid4().hex[:12]  # wandb run ids: lowercase letters and digits
    write_text(path, new + "\n")
    return new
