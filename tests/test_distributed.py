"""How processes agree: an error on one process reaches every process at the next exchange, with the
same message and exit status, and nothing hangs. Two real gloo processes, no models (a few seconds)."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mpo.distributed import (
    RankFailure,
    any_rank,
    end_session,
    errors_reach_every_rank,
    gather,
    main_process_first,
    wait_for_everyone,
)
from mpo.store import StoreError


@errors_reach_every_rank
def _stage_failing_on(rank: int, failing: int, error: Exception) -> str:
    """A stage whose per-process work fails on one process, then waits for the others."""
    if rank == failing:
        raise error
    wait_for_everyone()
    return "finished"


def _load_first(rank: int, failing: int) -> str:
    @errors_reach_every_rank
    def stage() -> str:
        with main_process_first():
            if rank == failing:
                raise StoreError(f"model.path broken on rank {rank}")
        return "loaded"

    return stage()


SCENARIOS = {
    "rank 1 fails (bad input)": lambda r: _stage_failing_on(
        r, 1, StoreError("shard-00001.safetensors: damaged")
    ),
    "rank 0 fails (bad input)": lambda r: _stage_failing_on(r, 0, StoreError("prompts.parquet: damaged")),
    "rank 1 hits a bug": lambda r: _stage_failing_on(r, 1, KeyError("oops")),
    "main fails while loading first": lambda r: _load_first(r, 0),
    "other fails while loading after": lambda r: _load_first(r, 1),
    "gather": lambda r: gather(None, {"rank": r}),
    "a signal on one process": lambda r: any_rank(r == 1),
    "no signal": lambda r: any_rank(False),
    "fails after the last exchange": lambda r: _late_failure(r),
}


@errors_reach_every_rank
def _late_failure(rank: int) -> str:
    if rank == 1:
        raise StoreError("export.json: unreadable")
    return "done"


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            value = scenario(rank)
            if name == "fails after the last exchange":
                end_session()  # the closing exchange of a command
            results[name] = ["ok", value]
        except RankFailure as err:
            results[name] = ["RankFailure", str(err), err.exit_status]
        except Exception as err:
            results[name] = [type(err).__name__, str(err)]
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))
    os._exit(0)  # as the command does after a failure: the group is not torn down at interpreter exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_an_error_on_one_process_stops_every_process_with_its_message(tmp_path):
    context = mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the processes hung")
    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))

    failure = ["RankFailure", "shard-00001.safetensors: damaged (rank 1 of 2)", 2]
    assert r0["rank 1 fails (bad input)"] == r1["rank 1 fails (bad input)"] == failure
    failure = ["RankFailure", "prompts.parquet: damaged (rank 0 of 2)", 2]
    assert r0["rank 0 fails (bad input)"] == r1["rank 0 fails (bad input)"] == failure
    # A bug keeps its own exception (and traceback) where it happened; the others stop with status 1.
    assert r1["rank 1 hits a bug"] == ["KeyError", "'oops'"]
    assert r0["rank 1 hits a bug"] == ["RankFailure", "KeyError: 'oops' (rank 1 of 2)", 1]
    for name, rank in (("main fails while loading first", 0), ("other fails while loading after", 1)):
        failure = ["RankFailure", f"model.path broken on rank {rank} (rank {rank} of 2)", 2]
        assert r0[name] == r1[name] == failure, name
    assert r0["gather"] == r1["gather"] == ["ok", [{"rank": 0}, {"rank": 1}]]
    assert r0["a signal on one process"] == r1["a signal on one process"] == ["ok", True]
    assert r0["no signal"] == r1["no signal"] == ["ok", False]
    failure = ["RankFailure", "export.json: unreadable (rank 1 of 2)", 2]
    assert r0["fails after the last exchange"] == r1["fails after the last exchange"] == failure


def test_one_process_raises_its_own_error():
    with pytest.raises(StoreError, match="damaged"):
        _stage_failing_on(0, 0, StoreError("damaged"))
    assert gather(None, 5) == [5] and any_rank(True) and not any_rank(False)
