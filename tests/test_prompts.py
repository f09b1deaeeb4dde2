"""Prompts from every source a user has them in, and one clear line when the file or column is wrong."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest

from mpo.config import load_recipe, resolve_paths
from mpo.prompts import PromptsError, is_hub_dataset_id, read_prompts
from mpo.store import prepare_prompts, read_parquet
from tests.scripts.tiny_runs import SDXL

TEXTS = ["a red car", "a cat, sitting", 'a "quoted" dog', "a bird\twith a tab"]


def _write_all(tmp_path, column="caption"):
    files = {}
    files["txt"] = tmp_path / "p.txt"
    files["txt"].write_text("\n".join([TEXTS[0], "", *TEXTS[1:]]) + "\n")
    files["jsonl"] = tmp_path / "p.jsonl"
    files["jsonl"].write_text("\n".join(json.dumps({column: t, "id": i}) for i, t in enumerate(TEXTS)))
    frame = pd.DataFrame({"id": range(4), column: TEXTS})
    files["csv"] = tmp_path / "p.csv"
    frame.to_csv(files["csv"], index=False)
    files["parquet"] = tmp_path / "p.parquet"
    frame.to_parquet(files["parquet"])
    files["saved"] = tmp_path / "saved"
    datasets.Dataset.from_pandas(frame).save_to_disk(str(files["saved"]))
    files["saved_dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_pandas(frame), "test": datasets.Dataset.from_dict({column: ["x"]})}
    ).save_to_disk(str(files["saved_dict"]))
    files["raw_folder"] = tmp_path / "raw"
    files["raw_folder"].mkdir()
    frame.to_csv(files["raw_folder"] / "train.csv", index=False)
    return files


def test_every_format_gives_the_same_prompts_in_order(tmp_path):
    files = _write_all(tmp_path)
    for kind, path in files.items():
        column = "prompt" if kind == "txt" else "caption"
        assert read_prompts(path, column) == TEXTS, kind
    assert read_prompts(files["saved_dict"], "caption", split="test") == ["x"]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "saved", "saved_dict", "raw_folder"])
def test_a_wrong_column_is_named_with_the_file_and_the_columns_there(tmp_path, kind):
    path = _write_all(tmp_path)[kind]
    with pytest.raises(PromptsError) as err:
        read_prompts(path, "text")
    message = str(err.value)
    assert str(path) in message and "'text'" in message and "prompts.column" in message
    assert "caption" in message  # what the user could have meant
    assert "\n" not in message


def test_other_errors_name_the_source(tmp_path):
    saved_dict = _write_all(tmp_path)["saved_dict"]
    with pytest.raises(PromptsError, match=r"no such file or folder"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.tsv").write_text("x")
    with pytest.raises(PromptsError, match=r"unsupported suffix '\.tsv'"):
        read_prompts(tmp_path / "p.tsv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(PromptsError, match=r"bad\.jsonl:2: not valid JSON"):
        read_prompts(bad)
    numbers = tmp_path / "n.parquet"
    pd.DataFrame({"prompt": [1, 2]}).to_parquet(numbers)
    with pytest.raises(PromptsError, match=r"n\.parquet: row 0: column 'prompt' holds 1"):
        read_prompts(numbers)
    with pytest.raises(PromptsError, match=r"no split 'validation'.*splits: \['train', 'test'\]"):
        read_prompts(saved_dict, "caption", "validation")


def test_a_hub_id_is_loaded_with_load_dataset_and_its_failure_named(tmp_path, monkeypatch):
    assert is_hub_dataset_id("owner/prompts") and not is_hub_dataset_id("data/p.txt")
    assert not is_hub_dataset_id(str(tmp_path))
    seen = {}

    def fake_load_dataset(path, split=None, **kwargs):
        seen.update(path=path, split=split)
        return datasets.Dataset.from_dict({"caption": TEXTS})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_prompts("owner/prompts", "caption", "validation") == TEXTS
    assert seen == {"path": "owner/prompts", "split": "validation"}

    def offline(path, split=None, **kwargs):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PromptsError, match=r"'owner/prompts' \(hub dataset, split 'train'\): cannot load it"):
        read_prompts("owner/prompts")


def test_recipe_column_reaches_the_prompt_table_and_hub_ids_stay_unresolved(tmp_path):
    files = _write_all(tmp_path)
    recipe = load_recipe(
        str(SDXL),
        [f"output_dir={tmp_path / 'run'}", f"prompts.file={files['csv']}", "prompts.column=caption"],
    )
    table = prepare_prompts(recipe)
    assert table["prompt"].tolist() == TEXTS
    assert read_parquet(tmp_path / "run" / "prompts.parquet")["prompt"].tolist() == TEXTS
    hub = load_recipe(str(SDXL), ["prompts.file=owner/prompts"])
    assert resolve_paths(hub).prompts.file == "owner/prompts"
