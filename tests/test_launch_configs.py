"""The launch/ configs: accelerate can read them, DeepSpeed ones name a JSON that derives the batch size,
the SLURM script starts one correctly-ranked launcher per node, and ZeRO-2 really runs on 2 CPU ranks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType

from tests.scripts.processes import run_launch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
YAMLS = sorted(LAUNCH.glob("*.yaml"))
JSONS = sorted((LAUNCH / "deepspeed").glob("*.json"))
AUTO = "auto"


def _yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_expected_configs_exist():
    names = {p.name for p in YAMLS}
    expected = {
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "multi_node.yaml",
        "cpu_ddp.yaml",
        "cpu_deepspeed_zero2.yaml",
    }
    assert expected <= names, f"missing launch configs: {sorted(expected - names)}"
    assert {p.name for p in JSONS} >= {"zero2.json", "zero3.json"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_parses_with_accelerates_loader(path):
    raw = _yaml(path)
    assert isinstance(raw, dict), f"{path.name}: not a mapping"
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    assert config.num_processes % config.num_machines == 0, (
        f"{path.name}: processes not split evenly over nodes"
    )
    if config.distributed_type == DistributedType.DEEPSPEED:
        ds_file = raw["deepspeed_config"]["deepspeed_config_file"]
        assert (ROOT / ds_file).is_file(), f"{path.name}: deepspeed_config_file {ds_file} does not exist"
        _json(ROOT / ds_file)
        # accelerate rejects mixed_precision next to a deepspeed_config_file at Accelerator() time.
        assert "mixed_precision" not in raw, (
            f"{path.name}: mixed_precision conflicts with deepspeed_config_file"
        )
    else:
        assert "deepspeed_config" not in raw or not raw["deepspeed_config"]


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_deepspeed_json_derives_batch_size_and_takes_the_recipes_values(path):
    config = _json(path)
    assert config.get("train_batch_size", AUTO) == AUTO, f"{path.name}: fixed train_batch_size"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config.get(key) == AUTO, f"{path.name}: {key} must be 'auto' (filled from the recipe)"
    assert config["bf16"]["enabled"] == AUTO, f"{path.name}: bf16.enabled must follow the recipe"
    assert "optimizer" not in config and "scheduler" not in config, (
        f"{path.name}: optimizer is made in Python"
    )
    zero = config["zero_optimization"]
    # accelerate fills these "auto" keys from model.config.hidden_size, which diffusers denoisers lack.
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert zero.get(key) != AUTO, f"{path.name}: zero_optimization.{key} cannot be 'auto' here"
    expected_stage = int(path.stem.removeprefix("zero"))
    assert zero["stage"] == expected_stage


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_accelerate_fills_the_json_from_the_plugin(path, monkeypatch):
    for var in (
        "ACCELERATE_CONFIG_DS_FIELDS",
        "ACCELERATE_GRADIENT_CLIPPING",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    ):
        monkeypatch.delenv(var, raising=False)
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), gradient_clipping=0.25, gradient_accumulation_steps=4)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.25
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 4
    assert plugin.zero_stage == _json(path)["zero_optimization"]["stage"]
    assert plugin.zero3_save_16bit_model == (plugin.zero_stage == 3)


def test_zero3_gathers_16bit_weights_on_save():
    zero = _json(LAUNCH / "deepspeed" / "zero3.json")["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_multi_node_uses_deepspeed_with_the_standard_launcher():
    raw = _yaml(LAUNCH / "multi_node.yaml")
    assert raw["distributed_type"] == "DEEPSPEED"
    assert raw["num_machines"] > 1
    # "standard" runs torchrun on each node, which is what srun gives us (pdsh would ssh to the others).
    assert raw["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_exe(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _render_torchrun(args: list[str]):
    """What ``accelerate launch ARGS`` would start on its node, without starting it: accelerate's own
    launch code runs up to torchrun, which is replaced by a recorder. Returns torchrun's launch config
    (nodes, processes per node, rendezvous), the worker command and the environment it is given."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import launch_command, launch_command_parser

    seen = {}

    def record(torchrun_args):
        seen["config"], seen["cmd"], seen["cmd_args"] = distrib_run.config_from_args(torchrun_args)
        seen["env"] = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}

    real = distrib_run.run
    distrib_run.run = record
    try:
        launch_command(launch_command_parser().parse_args(args))
    finally:
        distrib_run.run = real
    return seen


def test_slurm_script_starts_one_ranked_launcher_per_node(tmp_path, monkeypatch):
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    _write_exe(bin_dir / "scontrol", 'printf "gpu-node-a\\ngpu-node-b\\n"\n')
    # Fake srun: run the task once per node, as SLURM would on each node, with that node's SLURM_NODEID.
    _write_exe(
        bin_dir / "srun",
        """
        while [[ $1 == --* ]]; do shift; done
        for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit 1; done
        """,
    )
    _write_exe(bin_dir / "accelerate", 'printf "%s\\n" "$@" > "$FAKE_OUT/node-$SLURM_NODEID"\n')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_OUT": str(out),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    script = LAUNCH / "slurm_multinode.sbatch"
    port = str(_free_port())
    env["MAIN_PORT"] = port
    result = subprocess.run(
        ["bash", str(script), "recipes/sdxl/mpo.yaml", "train.max_steps=5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ranks = []
    monkeypatch.chdir(ROOT)  # the script runs from the submit dir: the configs' relative paths start there
    for node in (0, 1):
        args = (out / f"node-{node}").read_text().splitlines()
        options = dict(zip(args[1::2], args[2::2]))
        assert args[0] == "launch"
        assert options["--config_file"] == "launch/multi_node.yaml"
        assert (ROOT / options["--config_file"]).is_file()
        assert options["--num_machines"] == "2"
        assert options["--num_processes"] == "16"
        assert options["--machine_rank"] == str(node)
        assert options["--main_process_ip"] == "gpu-node-a"
        assert options["--main_process_port"] == port
        assert args[-5:] == ["-m", "mpo.cli", "run", "recipes/sdxl/mpo.yaml", "train.max_steps=5"]
        assert (ROOT / args[-2]).is_file()  # the recipe, relative to the submit dir

        # What accelerate makes of this node's command line: torchrun with 8 workers of 2 x 8, node rank
        # `node`, every node meeting at the first node's port; DeepSpeed's config file found from there.
        launched = _render_torchrun(args[1:])
        config = launched["config"]
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
        assert config.rdzv_backend == "static" and config.rdzv_configs["rank"] == node
        assert config.rdzv_endpoint == f"gpu-node-a:{port}"
        assert launched["cmd_args"][-5:] == args[-5:] and "-m" in launched["cmd_args"]
        assert launched["env"]["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert (ROOT / launched["env"]["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).is_file()
        ranks += [
            config.rdzv_configs["rank"] * config.nproc_per_node + local
            for local in range(config.nproc_per_node)
        ]
    assert sorted(ranks) == list(range(16))  # every global rank once, none twice


_DEEPSPEED_SCRIPT = """
import json, os, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

torch.set_num_threads(1)
plugin = DeepSpeedPlugin(hf_ds_config=os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"], gradient_clipping=0.5)
acc = Accelerator(
    kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    deepspeed_plugin=plugin,
    gradient_accumulation_steps=2,
    mixed_precision="no",
)
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
x = torch.randn(32, 4)
data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
loader = torch.utils.data.DataLoader(data, batch_size=2)
model, opt, loader = acc.prepare(model, opt, loader)
steps, first = 0, []
for xb, yb in loader:
    first.append(xb[0].tolist())
    with acc.accumulate(model):
        acc.backward(torch.nn.functional.mse_loss(model(xb), yb))
        opt.step()
        opt.zero_grad()
    steps += acc.sync_gradients
    if steps == 3:
        break
cfg = acc.state.deepspeed_plugin.deepspeed_config
state = acc.get_state_dict(model)
with open(os.path.join(sys.argv[1], f"rank{acc.process_index}.json"), "w") as f:
    json.dump({
        "type": str(acc.distributed_type), "world": acc.num_processes,
        "train_batch_size": cfg["train_batch_size"], "micro": cfg["train_micro_batch_size_per_gpu"],
        "accumulation": cfg["gradient_accumulation_steps"], "clipping": cfg["gradient_clipping"],
        "first": first,
        "weight": model.module.weight.detach().flatten().tolist() if hasattr(model, "module") else None,
        "saved": sorted(state) if state else None,
    }, f)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_deepspeed_zero2_trains_on_two_ranks(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(_DEEPSPEED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would disable DeepSpeed
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--config_file",
        "launch/cpu_deepspeed_zero2.yaml",
        "--main_process_port",
        "29533",
        str(script),
        str(tmp_path),
    ]
    result = run_launch(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [_json(tmp_path / f"rank{r}.json") for r in (0, 1)]
    for info in ranks:
        assert info["type"] == "DistributedType.DEEPSPEED" and info["world"] == 2
        assert (info["micro"], info["accumulation"], info["clipping"]) == (2, 2, 0.5)
        assert info["train_batch_size"] == 2 * 2 * 2  # micro x accumulation x world size
    assert ranks[0]["first"] != ranks[1]["first"], "both ranks read the same batches"
    assert ranks[0]["weight"] == ranks[1]["weight"], "ranks diverged: gradients were not averaged"
    assert ranks[0]["saved"] == ["bias", "weight"]


def test_recipes_name_existing_launch_configs():
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        launch_config = (_yaml(recipe) or {}).get("launch_config")
        if launch_config:
            assert (ROOT / launch_config).is_file(), f"{recipe}: launch_config {launch_config} does not exist"
