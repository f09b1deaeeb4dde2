"""Upload of an export folder to the Hugging Face Hub (``export.push_to_hub``), with huggingface_hub.

::

    mpo export RECIPE export.push_to_hub.repo_id=me/tiny-sdxl-mpo export.push_to_hub.revision=step-40

Three calls of :class:`huggingface_hub.HfApi`: ``create_repo`` (private unless told otherwise; an
existing repo is reused), ``create_branch`` when a revision is named, and one ``upload_folder`` commit
of the export (the card, the pipeline, the LoRA files; never the run's own bookkeeping). The token is
huggingface_hub's usual one (``HF_TOKEN`` or ``hf auth login``); it is never written into the run.
What was pushed is recorded in ``<run>/export_push.json``, so a rerun of an up-to-date export that
was already pushed to the same place does not push again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpo.logs import get_logger
from mpo.store import write_text

PUSH_RECORD = "export_push.json"
NOT_UPLOADED = ("export.json", ".*")  # bookkeeping of the run directory, hidden files

log = get_logger(__name__)


class HubError(RuntimeError):
    """The upload failed; the export on disk is complete and a rerun retries the upload."""


def push_record_path(run_root: Path) -> Path:
    return Path(run_root) / PUSH_RECORD


def already_pushed(run_root: Path, cfg: Any, record: dict[str, Any]) -> bool:
    path = push_record_path(run_root)
    if not path.exists():
        return False
    stored = json.loads(path.read_text())
    return (
        stored.get("export") == record
        and stored.get("repo_id") == cfg.repo_id
        and (stored.get("revision") == cfg.revision)
    )


def push_export(
    folder: Path, cfg: Any, record: dict[str, Any], run_name: str, api: Any = None
) -> dict[str, Any]:
    """Upload ``folder`` to ``cfg.repo_id`` (at ``cfg.revision``); returns what was pushed."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    message = cfg.commit_message or f"{run_name}: checkpoint {record['checkpoint']} (step {record['step']})"
    try:
        repo = api.create_repo(
            repo_id=cfg.repo_id, repo_type="model", private=bool(cfg.private), exist_ok=True
        )
        if cfg.revision:
            api.create_branch(repo_id=cfg.repo_id, repo_type="model", branch=cfg.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=cfg.repo_id,
            repo_type="model",
            folder_path=str(folder),
            revision=cfg.revision,
            commit_message=message,
            ignore_patterns=list(NOT_UPLOADED),
        )
    except Exception as err:  # network, auth, quota: one line, and the export stays as it is
        raise HubError(
            f"export.push_to_hub.repo_id={cfg.repo_id!r}: upload failed ({type(err).__name__}: {err}); "
            f"the export in {folder} is complete, rerun `mpo export` to retry"
        ) from err
    pushed = {
        "repo_id": cfg.repo_id,
        "revision": cfg.revision,
        "url": str(getattr(repo, "url", repo)),
        "commit": getattr(commit, "oid", None) or str(commit),
        "export": record,
    }
    log.info("pushed %s to %s (%s)", folder, cfg.repo_id, cfg.revision or "main")
    return pushed


def save_push_record(run_root: Path, pushed: dict[str, Any]) -> None:
    write_text(push_record_path(run_root), json.dumps(pushed, indent=2))
