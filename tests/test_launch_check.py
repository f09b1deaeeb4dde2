"""Processes a launcher started together must form one distributed group: ranks that are not wrapped
for DDP would split the data but never average their gradients, and say nothing."""

from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from mpo.distributed import LaunchError, check_process_group
from mpo.errors import exit_status

TWO = {"WORLD_SIZE": "2"}


@pytest.mark.parametrize("processes", [1, 2])
def test_launched_processes_outside_a_distributed_group_are_refused_with_the_fix(processes):
    with pytest.raises(
        LaunchError, match=r"started 2 processes .*not be averaged.*ACCELERATE_USE_CPU=true"
    ) as caught:
        check_process_group(processes, DistributedType.NO, TWO)
    assert exit_status(caught.value) == 2


@pytest.mark.parametrize(
    ("processes", "kind", "env"),
    [
        (1, DistributedType.NO, {}),
        (1, DistributedType.NO, {"WORLD_SIZE": "1"}),
        (2, DistributedType.MULTI_CPU, TWO),
        (2, DistributedType.DEEPSPEED, TWO),
    ],
)
def test_a_single_process_or_a_formed_group_passes(processes, kind, env):
    check_process_group(processes, kind, env)
