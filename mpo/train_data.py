"""Training data: which pairs train, in which order, and the tensors of one pair.

The order is a pure function of ``train.seed``: an endless stream of epochs, each a seeded permutation
of the training pairs. Stream position ``i`` names one pair occurrence, and everything random about it
(the shared noise of winner and loser, and their timestep) is drawn from a generator seeded by
``(train.seed, i)``. Global micro-step ``k`` consumes positions ``[k*B*W, (k+1)*B*W)`` (``B`` pairs per
process, ``W`` processes) and process ``r`` takes ``B`` of them starting at ``k*B*W + r*B``. So:

- the data position is one integer (pairs consumed), saved in every checkpoint; a resumed run reads
  exactly the pairs, noise and timesteps an uninterrupted run would have read;
- an optimizer step sees the same pairs with the same noise whatever its split into processes,
  micro-batches and accumulation steps (batch 1 x accumulation 2 is batch 2 x accumulation 1).

Nothing here runs a VAE or a text encoder: latents and prompt embeddings come from the candidate
cache (:class:`mpo.store.CandidateStore`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mpo.backbones.schedules import TimestepSampler, timestep_bounds
from mpo.seeds import candidate_seed
from mpo.store import CandidateStore, RunDir, StoreError, read_parquet, verify_shard

PAIR_KEYS = ("prompt_id", "win", "lose")
__all__ = ["PairDataset", "load_train_pairs", "make_dataloader", "timestep_bounds", "verify_candidates"]


def load_train_pairs(run: RunDir) -> pd.DataFrame:
    """pairs.parquet restricted to train-split prompts, in a fixed order (prompt_id, win, lose)."""
    for path, stage in ((run.pairs_parquet, "select"), (run.prompts_parquet, "generate")):
        if not path.exists():
            raise StoreError(f"{path}: missing; run the {stage} stage first")
    pairs = read_parquet(run.pairs_parquet)
    missing = [c for c in PAIR_KEYS if c not in pairs.columns]
    if missing:
        raise StoreError(f"{run.pairs_parquet}: missing columns {missing} (has {list(pairs.columns)})")
    splits = read_parquet(run.prompts_parquet).set_index("prompt_id")["split"]
    split = pairs["prompt_id"].map(splits)
    if split.isna().any():
        orphan = int(pairs.loc[split.isna(), "prompt_id"].iloc[0])
        raise StoreError(f"{run.pairs_parquet}: prompt_id {orphan} is not in {run.prompts_parquet}")
    train = pairs[split == "train"].sort_values(list(PAIR_KEYS), kind="stable").reset_index(drop=True)
    if train.empty:
        raise StoreError(
            f"{run.pairs_parquet}: no pairs for train-split prompts ({len(pairs)} pairs in total); "
            "lower select.threshold or generate more candidates"
        )
    return train[list(PAIR_KEYS)].astype("int64")


def verify_candidates(run: RunDir, rank: int, world_size: int) -> list[str]:
    """Check this process's share of the candidate shards (every ``world_size``-th, from ``rank``)
    against their content hashes; returns the names of all shards, which are verified once every
    process has checked its share (the caller waits for that). Done before training, so that a damaged
    shard stops every process with its name instead of one process in the middle of a step."""
    if not run.candidates_parquet.exists():
        raise StoreError(f"{run.candidates_parquet}: missing; run the generate stage first")
    shards = sorted(read_parquet(run.candidates_parquet)["shard"].unique())
    for name in shards[rank::world_size]:
        verify_shard(run.candidates_dir / f"{name}.safetensors")
    return [str(name) for name in shards]


class PairDataset(Dataset):
    """Item ``i`` is stream position ``i``: its pair's cached tensors plus its noise and timestep.

    ``timesteps`` is the backbone's :class:`TimestepSampler` (``Backbone.timestep_sampler``), or
    integer bounds ``(low, high)`` for uniform draws.
    """

    def __init__(
        self,
        run: RunDir,
        pairs: pd.DataFrame,
        seed: int,
        timesteps: TimestepSampler | tuple[int, int],
        verified: list[str] | None = None,
    ) -> None:
        self.store = CandidateStore(run, verified=verified or ())
        self.pairs = pairs[list(PAIR_KEYS)].to_numpy()
        self.seed = int(seed)
        self.timesteps = timesteps if isinstance(timesteps, TimestepSampler) else TimestepSampler(*timesteps)
        self._epoch: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:  # the stream is endless; this is one epoch
        return len(self.pairs)

    def pair_index(self, position: int) -> int:
        """Which row of the pair table stream position ``position`` is."""
        epoch, offset = divmod(int(position), len(self.pairs))
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(candidate_seed(self.seed, "epoch", epoch))
            self._epoch = (epoch, torch.randperm(len(self.pairs), generator=generator))
        return int(self._epoch[1][offset])

    def pair_at(self, position: int) -> tuple[int, int, int]:
        prompt_id, win, lose = self.pairs[self.pair_index(position)]
        return int(prompt_id), int(win), int(lose)

    def __getitem__(self, position: int) -> dict[str, Any]:
        prompt_id, win, lose = self.pair_at(position)
        latents = self.store.latents([prompt_id, prompt_id], [win, lose]).float()
        embeds = self.store.embeddings([prompt_id])
        generator = torch.Generator().manual_seed(candidate_seed(self.seed, "noise", position))
        noise = torch.randn(latents.shape[1:], generator=generator)
        timestep = self.timesteps(generator)
        return {
            "position": position,
            "pair": torch.tensor([prompt_id, win, lose]),
            "latents_w": latents[0],
            "latents_l": latents[1],
            "noise": noise,
            "timestep": timestep,
            "embeds": {key: value[0] for key, value in embeds.items()},
        }


class StreamBatchSampler(Sampler[list[int]]):
    """This process's stream positions, one micro-batch at a time, from micro-step ``start`` on."""

    def __init__(self, batch_size: int, rank: int, world_size: int, start: int = 0) -> None:
        self.batch_size, self.rank, self.world_size, self.start = batch_size, rank, world_size, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1


def make_dataloader(
    dataset: PairDataset,
    batch_size: int,
    rank: int,
    world_size: int,
    pairs_seen: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader resuming after ``pairs_seen`` pairs (a whole number of global micro-batches).

    pin_memory: page-locked batches (on a GPU machine), so that the step copies them to the device
    without blocking the host."""
    per_micro_step = batch_size * world_size
    if pairs_seen % per_micro_step:
        raise ValueError(
            f"the checkpoint has consumed {pairs_seen} pairs, not a multiple of train.batch_size x processes "
            f"= {per_micro_step}; resume with the batch size and process count it was written with"
        )
    sampler = StreamBatchSampler(batch_size, rank, world_size, start=pairs_seen // per_micro_step)
    # A private generator: creating the loader's iterator draws a worker seed, which must not come from
    # the global RNG that a resume restores (LoRA dropout draws from it).
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(dataset.seed),
    )
