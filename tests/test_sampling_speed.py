"""Generation speed options on the tiny families: attention kernels, channels-last input, the batch
size found by trying, the cache state after a cut-short call, and the per-block work counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpo.backbones.registry import get_backbone_class
from mpo.batch_fit import BatchPlan, find_prompts_per_batch, largest_fitting
from mpo.block_work import REST, count_block_work, format_fractions
from mpo.generate import plan_batches
from mpo.memory import MemoryEstimateError
from mpo.sampling import SamplingError, check_sampling
from mpo.schema import GenerateConfig
from tests.tiny_sampling import PROMPTS, STEPS, TinyBackbones, sample

# The SDPA kernels compute the same attention; on a CPU in float32 the math and flash kernels
# differ only in summation order (measured max |diff| < 1e-6 on the tiny models).
KERNEL_TOLERANCE = 1e-5
# NHWC convolutions (oneDNN on a CPU, cuDNN on a GPU) take other algorithms than NCHW ones: measured
# max |diff| 2.6e-5 on the tiny SDXL's latents after 4 steps.
CHANNELS_LAST_TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbones():
    return TinyBackbones()


_sample = sample


class _AllocatorLimit:
    """The allocator's refusal, simulated: a denoiser call with more than ``rows`` rows raises
    ``torch.OutOfMemoryError`` as a GPU that is too small would, after ``after`` calls that fit."""

    def __init__(self, denoiser: nn.Module, rows: int, after: int = 0) -> None:
        self.rows, self.after, self.refused = rows, after, 0
        self.handle = denoiser.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        first = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if first.shape[0] > self.rows:
            if self.after <= 0:
                self.refused += 1
                raise torch.OutOfMemoryError("simulated: out of memory")
            self.after -= 1

    def remove(self) -> None:
        self.handle.remove()


# ---- recipe checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "keys", "key", "says"),
    [
        ("sdxl", {"attention": "fast"}, "generate.attention", "sdpa_flash"),
        (
            "sdxl",
            {"attention": "flash"},
            "generate.attention",
            "dispatcher",
        ),  # UNet attention does not dispatch
        ("cogvideox", {"channels_last": True}, "generate.channels_last", "convolutional"),
        ("wan", {"channels_last": True}, "generate.channels_last", "convolutional"),
        ("sdxl", {"batch_size": "big"}, "generate.batch_size", "'auto'"),
        ("sdxl", {"batch_size": 0}, "generate.batch_size", "multiple"),
    ],
)
def test_bad_speed_keys_name_the_key(family, keys, key, says):
    problems = check_sampling(GenerateConfig(**keys), get_backbone_class(family).sampling_support)
    assert [k for k, _ in problems] == [key] and says in problems[0][1]


def test_good_speed_keys_pass():
    for family, keys in [
        ("sdxl", {"attention": "sdpa_flash", "channels_last": True, "batch_size": "auto"}),
        ("wan", {"attention": "flash"}),  # Wan's processors dispatch: diffusers' backends apply
        ("flux", {"attention": "_native_math"}),
        ("cogvideox", {"attention": "sdpa_math", "batch_size": 8}),
    ]:
        assert check_sampling(GenerateConfig(**keys), get_backbone_class(family).sampling_support) == []


# ---- attention kernels ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "cogvideox", "wan"])
def test_attention_kernels_are_used_and_agree_to_rounding(backbones, family):
    backbone, size = backbones[family]
    default = _sample(backbone, size, PROMPTS[:1])
    math_kernel = _sample(backbone, size, PROMPTS[:1], attention="sdpa_math")
    flash = _sample(backbone, size, PROMPTS[:1], attention="sdpa_flash")
    # The forced kernel really ran: the math kernel sums in another order than the default (flash).
    assert not torch.equal(math_kernel, default)
    torch.testing.assert_close(math_kernel, default, atol=KERNEL_TOLERANCE, rtol=KERNEL_TOLERANCE)
    torch.testing.assert_close(flash, default, atol=KERNEL_TOLERANCE, rtol=KERNEL_TOLERANCE)
    assert torch.equal(_sample(backbone, size, PROMPTS[:1], attention="sdpa_math"), math_kernel)
    # Scoped to the call: afterwards the default kernel again, bit for bit.
    assert torch.equal(_sample(backbone, size, PROMPTS[:1]), default)


def test_a_kernel_this_machine_lacks_is_one_clear_error(backbones):
    backbone, size = backbones["sdxl"]
    with pytest.raises(SamplingError, match=r"generate.attention='sdpa_efficient': .*cpu"):
        _sample(backbone, size, PROMPTS[:1], attention="sdpa_efficient")


def test_a_dispatch_backend_whose_package_is_missing_is_one_clear_error(backbones):
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    backbone, size = backbones["wan"]
    with pytest.raises(SamplingError, match=r"generate.attention='flash'"):
        _sample(backbone, size, PROMPTS[:1], attention="flash")
    _sample(backbone, size, PROMPTS[:1])  # the backbone still samples afterwards


def test_a_dispatch_backend_runs_the_denoisers_attention(backbones, monkeypatch):
    from diffusers.models import attention_dispatch

    backbone, size = backbones["wan"]
    default = _sample(backbone, size, PROMPTS[:1])
    used = []
    registry = attention_dispatch._AttentionBackendRegistry
    original = registry.get_active_backend.__func__

    def spy(cls):
        name, fn = original(cls)
        used.append(name.value)
        return name, fn

    monkeypatch.setattr(registry, "get_active_backend", classmethod(spy))
    native_math = _sample(backbone, size, PROMPTS[:1], attention="_native_math")
    assert used and set(used) == {"_native_math"}
    torch.testing.assert_close(native_math, default, atol=KERNEL_TOLERANCE, rtol=KERNEL_TOLERANCE)


# ---- channels-last ----------------------------------------------------------------------------------
def test_channels_last_runs_the_convolutions_in_nhwc_and_keeps_the_weights(backbones):
    backbone, size = backbones["sdxl"]
    unet = backbone.denoiser
    default = _sample(backbone, size, PROMPTS[:1])
    seen = []
    handle = unet.conv_in.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    try:
        nhwc = _sample(backbone, size, PROMPTS[:1], channels_last=True)
        assert seen and all(seen)
        seen.clear()
        _sample(backbone, size, PROMPTS[:1])
        assert seen and not any(seen)  # the hook is gone after the call
    finally:
        handle.remove()
    torch.testing.assert_close(nhwc, default, atol=CHANNELS_LAST_TOLERANCE, rtol=CHANNELS_LAST_TOLERANCE)
    assert torch.equal(_sample(backbone, size, PROMPTS[:1], channels_last=True), nhwc)  # deterministic
    assert all(p.is_contiguous() for p in unet.parameters())  # the trainer's weights are untouched


# ---- the batch size found by trying --------------------------------------------------------------------
def test_largest_fitting_bisects_below_the_cap():
    for limit in range(0, 12):
        tried = []

        def fits(k, limit=limit, tried=tried):
            tried.append(k)
            return k <= limit

        assert largest_fitting(10, fits) == min(limit, 10)
        assert len(tried) <= 1 + 4  # the cap, then log2(10) rounded up
    assert largest_fitting(10, lambda k: True) == 10


@pytest.mark.parametrize(("rows", "expected"), [(1000, 3), (11, 2), (8, 2), (7, 1)])
def test_auto_batch_is_the_largest_whole_prompt_batch_that_fits(backbones, rows, expected):
    """Two candidates per prompt, guidance doubles the rows: k prompts need 4k rows."""
    backbone, size = backbones["sdxl"]
    gen = GenerateConfig(
        num_inference_steps=STEPS, num_candidates=2, batch_size="auto", prompts_per_shard=3, **size
    )
    limit = _AllocatorLimit(backbone.denoiser, rows)
    try:
        plan = plan_batches(
            backbone, gen, PROMPTS[0], backbone.encode_negative(), torch.device("cpu"), torch.float32
        )
    finally:
        limit.remove()
    assert (plan.prompts, plan.auto) == (expected, True)


def test_auto_batch_refuses_when_not_one_prompt_fits(backbones):
    backbone, size = backbones["sdxl"]
    gen = GenerateConfig(num_inference_steps=STEPS, num_candidates=2, batch_size="auto", **size)
    limit = _AllocatorLimit(backbone.denoiser, 2)
    try:
        with pytest.raises(MemoryEstimateError, match=r"generate\.batch_size=auto: not even one prompt"):
            plan_batches(
                backbone, gen, PROMPTS[0], backbone.encode_negative(), torch.device("cpu"), torch.float32
            )
    finally:
        limit.remove()


def test_other_errors_in_a_probe_are_not_taken_for_memory():
    def probe(k):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        find_prompts_per_batch(probe, 4, 1, torch.device("cpu"))


def test_a_batch_that_runs_out_of_memory_later_is_redone_smaller(backbones, tmp_path, monkeypatch):
    """generate_shard with batch auto: the first batch of 3 prompts fails mid-way (after two denoiser
    calls); the shard is made 1 prompt at a time and equals the fixed-batch shard."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from mpo import generate
    from mpo.store import RunDir

    backbone, size = backbones["sdxl"]
    gen = GenerateConfig(
        num_inference_steps=STEPS, num_candidates=2, prompts_per_shard=3, previews=0, batch_size=2, **size
    )
    recipe = OmegaConf.create({"generate": OmegaConf.structured(gen), "model": {"dtype": "float32"}})
    plan = generate.ShardPlan(0, [0, 1, 2], PROMPTS, 0)
    negative = backbone.encode_negative()
    fixed, auto = RunDir(tmp_path / "fixed"), RunDir(tmp_path / "auto")
    for run in (fixed, auto):
        run.make_dirs()
    generate.generate_shard(backbone, plan, negative, recipe, fixed, {}, torch.device("cpu"))
    recipe.generate.batch_size = "auto"
    limit = _AllocatorLimit(backbone.denoiser, 4, after=2)
    try:
        batch = BatchPlan(3, auto=True)
        generate.generate_shard(backbone, plan, negative, recipe, auto, {}, torch.device("cpu"), batch=batch)
    finally:
        limit.remove()
    assert limit.refused == 1 and batch.prompts == 1
    a, b = load_file(str(fixed.shard(0))), load_file(str(auto.shard(0)))
    torch.testing.assert_close(b["latents"], a["latents"], atol=1e-5, rtol=1e-5)


# ---- cache state after a call an error cut short ----------------------------------------------------------
def test_a_cut_short_call_leaves_no_cache_state_for_the_next(backbones):
    """An error in mid-sampling (an out-of-memory retry, an interrupt caught by the caller) leaves
    the cache hooks holding that call's tensors; the next call must start fresh all the same."""
    backbone, size = backbones["cogvideox"]
    keys = {"num_inference_steps": 8, "cache": "pab", "cache_options": {}}
    fresh = _sample(backbone, size, PROMPTS[:1], **keys)
    limit = _AllocatorLimit(backbone.denoiser, 0, after=3)  # four rows per call: the fourth call fails
    try:
        with pytest.raises(torch.OutOfMemoryError):
            _sample(backbone, size, PROMPTS[1:2], **keys)
    finally:
        limit.remove()
    assert torch.equal(_sample(backbone, size, PROMPTS[:1], **keys), fresh)


# ---- work per block --------------------------------------------------------------------------------------
def test_block_work_counts_the_macs_of_linear_and_conv_layers():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 8)

        def forward(self, x):
            return self.proj(x)

    class Net(nn.Module):
        _repeated_blocks = ("Block",)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1, groups=3)
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, image, x, skip_second=False):
            self.conv(image)
            x = self.blocks[0](x)
            return x if skip_second else self.blocks[1](x[..., :4])

    net = Net()
    with count_block_work(net) as full:
        net(torch.zeros(1, 3, 5, 5), torch.zeros(2, 3, 4))
    assert full.macs == {"blocks.0": 2 * 3 * 8 * 4, "blocks.1": 2 * 3 * 8 * 4, REST: 6 * 25 * 1 * 9}
    with count_block_work(net) as skipped:
        net(torch.zeros(1, 3, 5, 5), torch.zeros(2, 3, 4), skip_second=True)
    assert skipped.fractions(full) == {"blocks.0": 1.0, "blocks.1": 0.0, REST: 1.0}
    assert format_fractions(skipped.fractions(full)) == "b0 100 b1 0 rest 100"


@pytest.mark.parametrize(("cache", "options"), [("pab", {}), ("first_block", {"threshold": 0.5})])
def test_block_work_shows_where_a_cache_hook_saves(backbones, cache, options):
    backbone, size = backbones["cogvideox"]
    blocks = backbone.sampling_support.compile_blocks
    with count_block_work(backbone.denoiser, blocks) as plain:
        _sample(backbone, size, PROMPTS[:1], num_inference_steps=8)
    with count_block_work(backbone.denoiser, blocks) as cached:
        _sample(backbone, size, PROMPTS[:1], num_inference_steps=8, cache=cache, cache_options=options)
    _sample(backbone, size, PROMPTS[:1], num_inference_steps=1)  # the cache off again
    shares = cached.fractions(plain)
    names = [n for n in plain.names if n != REST]
    assert len(names) == len(
        blocks and [m for m in backbone.denoiser.modules() if type(m).__name__ in blocks]
    )
    assert shares[REST] == pytest.approx(1.0)  # embeddings and the output layers always run
    assert min(shares[n] for n in names) < 0.95  # some block skipped work
    if cache == "first_block":
        assert shares[names[0]] == pytest.approx(1.0)  # the first block always runs: it decides
