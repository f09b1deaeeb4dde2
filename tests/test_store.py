"""Run-directory store: atomic writes, the prompt split, shards and the candidate reader; seeds and the
per-process split."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from mpo.config import Recipe
from mpo.distributed import split_for_process
from mpo.seeds import candidate_noise, candidate_seed
from mpo.store import (
    CandidateStore,
    RunDir,
    StoreError,
    atomic_write,
    build_manifest,
    describe_changes,
    prepare_prompts,
    read_shard_info,
    remove_temp_files,
    shard_index,
    split_prompts,
    temp_files,
    write_parquet,
    write_shard,
)


def _recipe(tmp_path, prompts_file, **prompts):
    recipe = OmegaConf.structured(Recipe)
    recipe.output_dir = str(tmp_path / "run")
    recipe.prompts.file = str(prompts_file)
    for key, value in prompts.items():
        recipe.prompts[key] = value
    return recipe


def _txt(tmp_path, n, name="prompts.txt"):
    path = tmp_path / name
    path.write_text("\n".join(f"prompt number {i}" for i in range(n)) + "\n\n")
    return path


# ---- atomic writes ------------------------------------------------------------------------------
def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "first"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_temp_files_are_found_and_removed_without_touching_final_files(tmp_path):
    (tmp_path / "shard-00000.safetensors").write_bytes(b"done")
    stale = tmp_path / ".shard-00001.safetensors.tmp-123-abcd"
    stale.write_bytes(b"half")
    other = tmp_path / ".score-00001.parquet.tmp-9-ffff"
    other.write_bytes(b"half")
    assert temp_files(tmp_path, "shard-00001.safetensors") == [stale]
    assert remove_temp_files(tmp_path) == sorted([stale, other])
    assert os.listdir(tmp_path) == ["shard-00000.safetensors"]


# ---- prompts ------------------------------------------------------------------------------------
def test_split_is_seeded_and_keeps_one_val_and_one_train():
    prompts = [f"p{i}" for i in range(20)]
    a = split_prompts(prompts, 0.25, None, split_seed=3)
    assert a.equals(split_prompts(prompts, 0.25, None, split_seed=3))
    assert (a["split"] == "val").sum() == 5
    assert list(a["prompt_id"]) == list(range(20)) and list(a["prompt"]) == prompts
    b = split_prompts(prompts, 0.25, None, split_seed=4)
    assert set(a.prompt_id[a.split == "val"]) != set(b.prompt_id[b.split == "val"])
    assert (split_prompts(prompts[:3], 0.01, None, 0)["split"] == "val").sum() == 1
    assert (split_prompts(prompts[:2], 0.9, None, 0)["split"] == "val").sum() == 1
    assert (split_prompts(prompts[:1], 0.5, None, 0)["split"] == "val").sum() == 0
    assert (split_prompts(prompts[:5], 0.0, None, 0)["split"] == "val").sum() == 0
    assert (split_prompts(prompts, 0.5, 2, 0)["split"] == "val").sum() == 2
    with pytest.raises(StoreError, match="val_count"):
        split_prompts(prompts[:3], 0.1, 3, 0)


def test_duplicate_prompts_land_in_one_split():
    """Split by unique text: a prompt repeated in the file is held out with all its copies, or not."""
    prompts = [f"p{i % 7}" for i in range(21)]  # 7 unique prompts, 3 copies each
    frame = split_prompts(prompts, 0.3, None, split_seed=1)
    per_text = frame.groupby("prompt")["split"].nunique()
    assert (per_text == 1).all()
    assert frame.loc[frame.split == "val", "prompt"].nunique() == 2  # round(0.3 * 7) unique prompts
    assert list(frame["prompt_id"]) == list(range(21))
    unique = [f"p{i}" for i in range(7)]  # without duplicates the split is what it always was
    assert list(split_prompts(unique, 0.3, None, 1)["split"]) == list(frame["split"][:7])


def test_prepare_prompts_reads_formats_and_applies_limit(tmp_path):
    texts = ["a red cube", "a blue ball", "a green cone"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": t, "extra": 1}) for t in texts))
    parquet = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": texts}).to_parquet(parquet)
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(texts))
    for i, path in enumerate((jsonl, parquet, txt)):
        frame = prepare_prompts(_recipe(tmp_path / str(i), path, limit=2))
        assert list(frame["prompt"]) == texts[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(StoreError, match=r"bad\.jsonl:2"):
        prepare_prompts(_recipe(tmp_path / "bad", bad))
    (tmp_path / "p.tsv").write_text("prompt\na\n")
    with pytest.raises(StoreError, match="unsupported suffix"):
        prepare_prompts(_recipe(tmp_path / "csv", tmp_path / "p.tsv"))


def test_prepare_prompts_writes_once_and_refuses_a_changed_split(tmp_path):
    path = _txt(tmp_path, 10)
    recipe = _recipe(tmp_path, path, val_fraction=0.2)
    first = prepare_prompts(recipe)
    written = RunDir.from_recipe(recipe).prompts_parquet
    assert pd.read_parquet(written).equals(first)
    mtime = written.stat().st_mtime_ns
    assert prepare_prompts(recipe).equals(first)
    assert written.stat().st_mtime_ns == mtime
    recipe.prompts.split_seed = 5
    with pytest.raises(StoreError, match=r"prompts\.parquet exists and differs"):
        prepare_prompts(recipe)
    recipe.prompts.split_seed = 0
    recipe.prompts.limit = 5
    with pytest.raises(StoreError, match="10 prompts vs 5"):
        prepare_prompts(recipe)


def test_prepare_prompts_does_not_write_when_told_not_to(tmp_path):
    recipe = _recipe(tmp_path, _txt(tmp_path, 4))
    frame = prepare_prompts(recipe, write=False)
    assert len(frame) == 4
    assert not RunDir.from_recipe(recipe).prompts_parquet.exists()


# ---- shards and the candidate store ---------------------------------------------------------------
def _write_run(tmp_path, prompts_per_shard=2, num_prompts=5, n=3):
    """Shards whose latent values encode (prompt_id, sample_idx) so every lookup can be checked."""
    run = RunDir(tmp_path / "run")
    run.make_dirs()
    infos = []
    for g, start in enumerate(range(0, num_prompts, prompts_per_shard)):
        pids = list(range(start, min(start + prompts_per_shard, num_prompts)))
        cands = [(p, s, candidate_seed(0, p, s)) for p in pids for s in range(n)]
        latents = torch.stack([torch.full((2, 3, 3), 10.0 * p + s) for p, s, _ in cands])
        embeds = {
            "prompt_embeds": torch.stack([torch.full((4, 6), float(p)) for p in pids]),
            "pooled": torch.tensor([[p, -p] for p in pids], dtype=torch.float16),
        }
        write_shard(run.shard(g), latents, embeds, pids, cands, fingerprint={"seed": 0})
        infos.append(read_shard_info(run.shard(g)))
    write_parquet(build_manifest(infos), run.candidates_parquet)
    with atomic_write(run.negative) as tmp:
        from safetensors.torch import save_file

        save_file({"prompt_embeds": torch.zeros(1, 4, 6), "pooled": torch.ones(1, 2)}, str(tmp))
    return run


def test_shard_metadata_round_trips_and_manifest_is_sorted(tmp_path):
    run = _write_run(tmp_path)
    info = read_shard_info(run.shard(1))
    assert info.index == 1 and shard_index(run.shard(1)) == 1
    assert info.candidates[:2] == [(2, 0, candidate_seed(0, 2, 0)), (2, 1, candidate_seed(0, 2, 1))]
    assert info.prompt_index == {2: 0, 3: 1}
    assert info.fingerprint == {"seed": 0}
    manifest = pd.read_parquet(run.candidates_parquet)
    assert list(manifest.columns) == ["prompt_id", "sample_idx", "seed", "shard", "offset"]
    assert len(manifest) == 15
    assert list(zip(manifest.prompt_id, manifest.sample_idx)) == [(p, s) for p in range(5) for s in range(3)]
    assert (
        manifest.loc[(manifest.prompt_id == 4) & (manifest.sample_idx == 2), "shard"].item() == "shard-00002"
    )
    with pytest.raises(StoreError, match="more than one shard"):
        build_manifest([info, info])


def test_describe_changes_names_each_changed_leaf():
    stored = {"model": {"path": "/a", "dtype": "float32"}, "generate": {"seed": 0}}
    now = {"model": {"path": "/b", "dtype": "float32"}, "generate": {"seed": 0, "extra": 1}}
    assert describe_changes(stored, now) == ["generate.extra: None -> 1", "model.path: '/a' -> '/b'"]
    assert describe_changes(stored, stored) == []


def test_read_shard_info_rejects_a_truncated_file(tmp_path):
    run = _write_run(tmp_path)
    data = run.shard(0).read_bytes()
    broken = tmp_path / "shard-00009.safetensors"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="shard-00009"):
        read_shard_info(broken)


def test_candidate_store_reads_the_right_rows_through_a_small_cache(tmp_path):
    run = _write_run(tmp_path)
    store = CandidateStore(run, max_open_shards=1)
    assert len(store) == 15
    pids, sidxs = [4, 0, 3, 0, 2], [2, 1, 0, 1, 2]
    latents = store.latents(pids, sidxs)
    assert latents.shape == (5, 2, 3, 3)
    assert latents[:, 0, 0, 0].tolist() == [10.0 * p + s for p, s in zip(pids, sidxs)]
    assert len(store._open) == 1
    embeds = store.embeddings([3, 0, 4])
    assert embeds["prompt_embeds"].shape == (3, 4, 6)
    assert embeds["prompt_embeds"][:, 0, 0].tolist() == [3.0, 0.0, 4.0]
    assert embeds["pooled"].dtype == torch.float16 and embeds["pooled"][:, 1].tolist() == [-3.0, 0.0, -4.0]
    negative = store.negative_embeddings()
    assert negative["pooled"].shape == (1, 2)
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone.latents([1], [1]), store.latents([1], [1]))
    with pytest.raises(StoreError, match="prompt_id=7"):
        store.latents([7], [0])


# ---- seeds --------------------------------------------------------------------------------------
def test_candidate_seed_is_stable_across_interpreters_and_distinct():
    seeds = {candidate_seed(s, p, i) for s in (0, 1) for p in range(20) for i in range(8)}
    assert len(seeds) == 2 * 20 * 8 and all(0 <= x < 2**63 for x in seeds)
    code = "from mpo.seeds import candidate_seed; print(candidate_seed(7, 'p3', 2), candidate_seed(7, 3, 2))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": h},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in ("1", "2")
    }
    assert outs == {f"{candidate_seed(7, 'p3', 2)} {candidate_seed(7, 3, 2)}\n"}


def test_candidate_noise_is_cpu_drawn_and_dtype_independent():
    a = candidate_noise((2, 4, 4), 123)
    assert torch.equal(a, torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(123)))
    assert torch.equal(candidate_noise((2, 4, 4), 123, dtype=torch.bfloat16), a.to(torch.bfloat16))
    assert not torch.equal(candidate_noise((2, 4, 4), 124), a)


# ---- per-process split --------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_split_for_process_covers_every_item_once(world):
    items = list(range(11))
    shares = [split_for_process(items, rank=r, world_size=world) for r in range(world)]
    assert sorted(x for share in shares for x in share) == items
    assert shares[0][:2] == [0, world]
