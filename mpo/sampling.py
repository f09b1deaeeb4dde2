"""Sampling settings of the generate stage: which scheduler, cache hooks and compilation.

Generating the candidates is the loop's dominant cost, and what MPO needs from it is not the pixels
but which pairs get selected: a cheaper sampler is good when it selects the same pairs
(``mpo calibrate`` measures that). This module turns the recipe's ``generate`` keys into diffusers
objects, the same way for every family; a backbone says only which names it maps to which classes
(:attr:`SamplingSupport`), so the generic loop never branches on a family.

Recipe keys (``generate.*``)
- ``scheduler``: ``default`` (the family's own deterministic sampler, the paper's), ``euler``,
  ``dpmpp_2m`` (DPM-Solver++ 2M), ``unipc``, ``ddim``, or the class name of one of the deterministic
  diffusers schedulers below. Built with ``from_config`` of the checkpoint's scheduler, so timestep
  spacing and prediction type carry over; ``scheduler_options`` are passed on top
  (e.g. ``{use_karras_sigmas: true}``).
- ``cache``: ``none``, ``first_block`` (FirstBlockCache), ``faster`` (FasterCache) or ``pab``
  (PyramidAttentionBroadcast), where the family's denoiser supports diffusers' cache hooks;
  ``cache_options`` are the config's fields (e.g. ``{threshold: 0.05}``).
- ``compile``: ``none``, ``regional`` (the repeated blocks, each compiled once and reused) or
  ``full`` (the whole denoiser). A compiled denoiser stays compiled for the backbone's life.
- ``attention``: ``default`` (PyTorch picks the SDPA kernel), ``sdpa_flash``, ``sdpa_efficient``,
  ``sdpa_cudnn`` or ``sdpa_math`` (that one kernel of ``scaled_dot_product_attention``, every family:
  all diffusers attention processors end there), or, for a denoiser whose processors go through
  diffusers' attention dispatcher (Wan, FLUX), one of its backends (``flash`` for the flash-attn
  package, ``_flash_3``, ``sage``, ``xformers``, ``flex``, ...). Scoped to the sampling call: the
  trainer's attention is untouched.
- ``channels_last``: the denoiser's input in channels-last layout, for convolutional denoisers
  (SDXL's UNet): cuDNN then runs every convolution in NHWC and the activations stay in it. The
  weights keep their layout (the trainer's optimizer and DeepSpeed's flat buffers own them), each
  convolution reads its weight in NHWC itself.

Determinism: every setting keeps a candidate a function of its seed and its batch, and batches are
fixed by the shard plan, so generation stays bitwise repeatable and independent of the number of
processes. A cache hook decides what to skip per batch (e.g. first-block cache compares the batch's
mean residual), so with a cache a candidate also depends on which candidates share its batch; the
hooks' state is cleared before every batch. Documented tolerances (tests/test_sampling.py): cache
hooks change the tiny CogVideoX's latents by < 5 % relative L2 (measured 0.3-1 %), regional compile
by < 1e-4 (measured 3e-6), batching across prompts by < 1e-5 (bitwise on CPU at one thread).

Every sampler sees the checkpoint's own training noise levels: when the default scheduler's config
has a key the new class does not know (CogVideoX's ``snr_shift_scale``), which would otherwise be
dropped and leave the new sampler walking a schedule the model was never trained on, the new class
gets ``trained_betas`` derived from the default one's ``alphas_cumprod`` instead. A zero terminal SNR is kept
at 2**-24, as diffusers does for its zero-SNR schedulers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SCHEDULER_DEFAULT = "default"
CACHE_KINDS = ("none", "first_block", "faster", "pab")
COMPILE_MODES = ("none", "regional", "full")
BATCH_AUTO = "auto"  # generate.batch_size: the largest batch of whole prompts that fits (mpo.batch_fit)
ATTENTION_DEFAULT = "default"
# generate.attention -> the scaled_dot_product_attention kernel it forces (torch.nn.attention).
SDPA_KERNELS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}
CPU_SDPA_KERNELS = ("sdpa_flash", "sdpa_math")  # the efficient and cuDNN kernels are CUDA's

# Short names -> (diffusers class name, the options that make it that sampler).
SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
}
# The same names for flow-matching families: the multistep solvers on flow sigmas, predicting
# velocity, with the checkpoint's shift (FlowMatchEuler's ``shift`` is their ``flow_shift``, and
# back for a family whose default is one of them, e.g. Wan's UniPC).
FLOW_SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
        },
    ),
    "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
FLOW_RENAMED = {"shift": "flow_shift", "flow_shift": "shift"}
# Schedulers whose step() is a deterministic function of (model output, t, sample): a candidate
# must be fixed by its initial noise alone, so ancestral and SDE samplers are refused.
DETERMINISTIC_SCHEDULERS = (
    "EulerDiscreteScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "CogVideoXDDIMScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
)
_STOCHASTIC_OPTIONS = {"algorithm_type": ("sde-dpmsolver", "sde-dpmsolver++")}


class SamplingError(ValueError):
    """A sampling setting this machine cannot run (e.g. an attention backend whose package is missing)."""


@dataclass(frozen=True)
class SamplingSupport:
    """What one family offers: scheduler names (aliases over :data:`SCHEDULER_ALIASES`), cache kinds
    its denoiser supports with their default options, and block classes that regional compilation
    compiles when the denoiser declares no ``_repeated_blocks`` itself."""

    schedulers: Mapping[str, tuple[str, dict[str, Any]]] = field(default_factory=lambda: SCHEDULER_ALIASES)
    caches: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    compile_blocks: tuple[str, ...] = ()
    regional_compile: bool = True  # False: the denoiser has no repeated blocks to compile one by one
    # Keys of the default scheduler's config that a chosen class knows by another name.
    renamed: Mapping[str, str] = field(default_factory=dict)
    # The denoiser's attention processors go through diffusers' dispatcher (its backends apply).
    attention_dispatch: bool = False
    # The denoiser is convolutional: a channels-last input makes its convolutions run in NHWC.
    channels_last: bool = False


# Flow-matching transformers whose blocks diffusers' cache hooks know and whose attention goes
# through its dispatcher (Wan, FLUX).
FLOW_TRANSFORMER_SUPPORT = SamplingSupport(
    schedulers=FLOW_SCHEDULER_ALIASES,
    renamed=FLOW_RENAMED,
    caches={"first_block": {"threshold": 0.05}, "pab": {"spatial_attention_block_skip_range": 2}},
    attention_dispatch=True,
)


def dispatch_backends() -> list[str]:
    """diffusers' attention backends (``diffusers.models.attention_dispatch.AttentionBackendName``)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def attention_names(support: SamplingSupport) -> list[str]:
    names = [ATTENTION_DEFAULT, *SDPA_KERNELS]
    return names + dispatch_backends() if support.attention_dispatch else names


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (fingerprints, diffusers configs)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def scheduler_class(name: str, support: SamplingSupport) -> tuple[type, dict[str, Any]] | None:
    """The diffusers class and base options for ``generate.scheduler`` (None for ``default``)."""
    import diffusers

    if name == SCHEDULER_DEFAULT:
        return None
    if name in support.schedulers:
        class_name, base = support.schedulers[name]
    elif name in DETERMINISTIC_SCHEDULERS:
        class_name, base = name, {}
    else:
        raise KeyError(name)
    return getattr(diffusers, class_name), dict(base)


def scheduler_names(support: SamplingSupport) -> list[str]:
    return [SCHEDULER_DEFAULT, *support.schedulers, *DETERMINISTIC_SCHEDULERS]


def _accepted(cls: type) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


def check_sampling(gen: Any, support: SamplingSupport) -> list[tuple[str, str]]:
    """Recipe checks of the sampling keys, as (key, message) pairs (no model is loaded)."""
    problems: list[tuple[str, str]] = []
    name = str(gen.scheduler)
    options = dict(_plain(gen.scheduler_options) or {})
    try:
        found = scheduler_class(name, support)
    except (KeyError, AttributeError):
        problems.append(("generate.scheduler", f"must be one of {scheduler_names(support)}"))
        found = None
    if name == SCHEDULER_DEFAULT and options:
        problems.append(("generate.scheduler_options", "goes with a generate.scheduler other than default"))
    if found is not None:
        cls, base = found
        accepted = _accepted(cls)
        for key in options:
            if key not in accepted:
                problems.append(
                    (
                        f"generate.scheduler_options.{key}",
                        f"is not an option of {cls.__name__}: {sorted(accepted)}",
                    )
                )
        for key, bad in _STOCHASTIC_OPTIONS.items():
            if options.get(key) in bad:
                problems.append(
                    (
                        f"generate.scheduler_options.{key}",
                        "is a stochastic sampler; a candidate must be fixed by its seed",
                    )
                )
        if not any(p[0].startswith("generate.scheduler_options") for p in problems):
            try:
                cls(**{**base, **options})
            except Exception as err:  # diffusers raises plain errors for bad values
                problems.append(("generate.scheduler_options", f"{cls.__name__} refuses them: {err}"))
    cache = str(gen.cache)
    cache_options = dict(_plain(gen.cache_options) or {})
    if cache not in CACHE_KINDS:
        problems.append(("generate.cache", f"must be one of {list(CACHE_KINDS)}"))
    elif cache != "none" and cache not in support.caches:
        supported = [k for k in CACHE_KINDS if k in support.caches]
        problems.append(
            (
                "generate.cache",
                f"is not supported by this family's denoiser (supported: {['none', *supported]})",
            )
        )
    elif cache == "none" and cache_options:
        problems.append(("generate.cache_options", "goes with a generate.cache other than none"))
    elif cache != "none":
        config_cls = _cache_config_class(cache)
        allowed = set(config_cls.__dataclass_fields__) - {"current_timestep_callback"}
        for key in cache_options:
            if key not in allowed or key.startswith("_") or key.endswith("_callback"):
                problems.append((f"generate.cache_options.{key}", f"is not a field of {config_cls.__name__}"))
    if str(gen.compile) not in COMPILE_MODES:
        problems.append(("generate.compile", f"must be one of {list(COMPILE_MODES)}"))
    elif str(gen.compile) == "regional" and not support.regional_compile:
        problems.append(
            (
                "generate.compile",
                "regional needs repeated blocks, which this family's denoiser lacks; use full",
            )
        )
    attention = str(getattr(gen, "attention", ATTENTION_DEFAULT))
    if attention not in attention_names(support):
        why = (
            ""
            if support.attention_dispatch
            else " (this family's attention does not use diffusers' dispatcher)"
        )
        problems.append(("generate.attention", f"must be one of {attention_names(support)}{why}"))
    if getattr(gen, "channels_last", False) and not support.channels_last:
        problems.append(
            (
                "generate.channels_last",
                "applies to convolutional denoisers only; this family's is a transformer",
            )
        )
    batch = getattr(gen, "batch_size", None)
    if batch is None or batch == BATCH_AUTO:
        return problems
    if not isinstance(batch, int) or batch < 1 or batch % gen.num_candidates:
        problems.append(
            (
                "generate.batch_size",
                f"must be null, {BATCH_AUTO!r} or a positive multiple of generate.num_candidates="
                f"{gen.num_candidates}",
            )
        )
    return problems


def _cache_config_class(kind: str) -> type:
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    return {
        "first_block": FirstBlockCacheConfig,
        "faster": FasterCacheConfig,
        "pab": PyramidAttentionBroadcastConfig,
    }[kind]


def _tuples(options: dict[str, Any]) -> dict[str, Any]:
    """YAML lists to the tuples the cache configs expect (timestep ranges, identifiers)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def build_scheduler(default: Any, name: str, options: Mapping[str, Any], support: SamplingSupport) -> Any:
    """``name`` built ``from_config`` of the family's default scheduler, on its training noise levels."""
    found = scheduler_class(name, support)
    if found is None:
        return default
    cls, base = found
    overrides = {**base, **dict(options)}
    accepted = _accepted(cls)
    config = {k: v for k, v in default.config.items() if not k.startswith("_")}
    lost = sorted(k for k in config if k not in accepted and k not in support.renamed)
    alphas = getattr(default, "alphas_cumprod", None)
    if lost and alphas is not None and "trained_betas" in accepted and "trained_betas" not in overrides:
        alphas = alphas.double().clone()
        alphas[-1] = alphas[-1].clamp(min=2.0**-24)  # zero terminal SNR: keep sigma finite
        previous = torch.cat([alphas.new_ones(1), alphas[:-1]])
        overrides["trained_betas"] = (1 - alphas / previous).tolist()
        if "rescale_betas_zero_snr" in accepted:
            overrides["rescale_betas_zero_snr"] = False  # already in the betas
    for source, target in support.renamed.items():
        if source in config and target in accepted and target not in overrides:
            overrides[target] = config[source]
    config = {k: v for k, v in config.items() if k in accepted}
    return cls.from_config({**config, **overrides})


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling keys of one generate section, hashable: a backbone keeps what it last applied."""

    scheduler: str = SCHEDULER_DEFAULT
    scheduler_options: tuple[tuple[str, Any], ...] = ()
    cache: str = "none"
    cache_options: tuple[tuple[str, Any], ...] = ()
    compile: str = "none"
    attention: str = ATTENTION_DEFAULT
    channels_last: bool = False

    @classmethod
    def from_generate(cls, gen: Any) -> SamplingSettings:
        def frozen(value: Any) -> tuple[tuple[str, Any], ...]:
            items = dict(_plain(value) or {})
            return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items.items()))

        return cls(
            str(getattr(gen, "scheduler", SCHEDULER_DEFAULT)),
            frozen(getattr(gen, "scheduler_options", None)),
            str(getattr(gen, "cache", "none")),
            frozen(getattr(gen, "cache_options", None)),
            str(getattr(gen, "compile", "none")),
            str(getattr(gen, "attention", ATTENTION_DEFAULT)),
            bool(getattr(gen, "channels_last", False)),
        )


class SamplingState:
    """What a backbone has applied to its pipeline: the scheduler in use, the cache hooks on the
    denoiser, whether it is compiled. :meth:`apply` costs nothing for unchanged settings (it runs at
    every ``sample``), and removes one cache before enabling another."""

    def __init__(self, default_scheduler: Any) -> None:
        self.default_scheduler = default_scheduler
        self.applied = SamplingSettings()
        self.scheduler = default_scheduler
        self.compiled = "none"
        self.denoiser: nn.Module | None = None

    def apply(
        self,
        settings: SamplingSettings,
        pipe: Any,
        denoiser: nn.Module,
        support: SamplingSupport,
        timestep: Callable[[], Any],
    ) -> None:
        before = self.applied
        if denoiser is not self.denoiser:  # a swapped-in denoiser (eval, export) has no hooks yet
            before = SamplingSettings(before.scheduler, before.scheduler_options)
            self.denoiser, self.compiled = denoiser, "none"
        if (settings.scheduler, settings.scheduler_options) != (before.scheduler, before.scheduler_options):
            self.scheduler = build_scheduler(
                self.default_scheduler, settings.scheduler, dict(settings.scheduler_options), support
            )
        pipe.scheduler = self.scheduler
        if (settings.cache, settings.cache_options) != (before.cache, before.cache_options):
            if getattr(denoiser, "_cache_config", None) is not None:
                denoiser.disable_cache()
            if settings.cache != "none":
                options = {**support.caches[settings.cache], **_tuples(dict(settings.cache_options))}
                config_cls = _cache_config_class(settings.cache)
                if "current_timestep_callback" in config_cls.__dataclass_fields__:
                    options["current_timestep_callback"] = timestep
                denoiser.enable_cache(config_cls(**options))
        if settings.compile != self.compiled and settings.compile != "none":
            compile_denoiser(denoiser, settings.compile, support)
            self.compiled = settings.compile
        self.applied = settings


@contextmanager
def attention_kernel(name: str, device: torch.device) -> Iterator[None]:
    """``generate.attention`` for the length of one sampling call on ``device``."""
    if name == ATTENTION_DEFAULT:
        yield
    elif name in SDPA_KERNELS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if device.type == "cpu" and name not in CPU_SDPA_KERNELS:
            raise SamplingError(
                f"generate.attention={name!r}: PyTorch has no such kernel on cpu (there: "
                f"{', '.join(CPU_SDPA_KERNELS)})"
            )
        with sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[name])):
            yield
    else:
        from diffusers.models.attention_dispatch import attention_backend

        with ExitStack() as stack:
            try:
                stack.enter_context(attention_backend(name))
            except (RuntimeError, ValueError, ImportError) as err:  # its package is missing, or no kernel
                raise SamplingError(f"generate.attention={name!r}: {err}") from None
            yield


@contextmanager
def channels_last_input(denoiser: nn.Module, enabled: bool) -> Iterator[None]:
    """Hand the denoiser its 4-D input in channels-last layout while sampling (nothing else changes:
    the weights keep their layout, so training and DeepSpeed never see a converted parameter)."""
    if not enabled:
        yield
        return

    def to_channels_last(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def convert(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                return value.contiguous(memory_format=torch.channels_last)
            return value

        return tuple(convert(a) for a in args[:1]) + args[1:], {
            k: convert(v) if k == "sample" else v for k, v in kwargs.items()
        }

    handle = denoiser.register_forward_pre_hook(to_channels_last, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def reset_cache(denoiser: nn.Module) -> None:
    """Forget what the cache hooks kept from the previous batch: each batch starts fresh, so a
    candidate does not depend on what was denoised before it."""
    if getattr(denoiser, "_cache_config", None) is not None:
        denoiser._reset_stateful_cache()


def compile_denoiser(denoiser: nn.Module, mode: str, support: SamplingSupport) -> None:
    """torch.compile in place: ``regional`` compiles each repeated block once (diffusers'
    ``compile_repeated_blocks`` where the model declares them, else the family's block classes),
    which compiles in seconds instead of minutes and recompiles nothing when the batch changes."""
    if mode == "full":
        denoiser.compile()
        return
    if getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks()
        return
    blocks = [m for m in denoiser.modules() if type(m).__name__ in support.compile_blocks]
    if not blocks:
        raise SamplingError(
            "generate.compile='regional': this denoiser declares no repeated blocks; use 'full'"
        )
    for block in blocks:
        block.compile()


class DenoiserCounter:
    """Counts denoiser evaluations (rows through the network, so classifier-free guidance's doubled
    batch counts twice) with a forward pre-hook: the cost measure of ``mpo calibrate`` and the
    benchmark, independent of the machine."""

    def __init__(self) -> None:
        self.rows = 0
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(iter(kwargs.values()), None)
        for value in (kwargs.get("hidden_states"), kwargs.get("sample"), first):
            if isinstance(value, torch.Tensor):
                self.rows += value.shape[0]
                break
        self.calls += 1


@contextmanager
def count_denoiser_calls(denoiser: nn.Module) -> Iterator[DenoiserCounter]:
    counter = DenoiserCounter()
    handle = denoiser.register_forward_pre_hook(counter, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def fingerprint_keys(gen: Any) -> dict[str, Any]:
    """The sampling keys that differ from their defaults, for generate's fingerprint: a recipe that
    leaves them alone keeps the fingerprint of shards made before these keys existed."""
    out: dict[str, Any] = {}
    defaults = {"scheduler": SCHEDULER_DEFAULT, "cache": "none", "compile": "none"}
    for key, default in defaults.items():
        if str(getattr(gen, key, default)) != default:
            out[key] = str(getattr(gen, key))
    for key in ("scheduler_options", "cache_options"):
        value = dict(_plain(getattr(gen, key, None)) or {})
        if value:
            out[key] = value
    batch = getattr(gen, "batch_size", None)
    if batch == BATCH_AUTO:
        out["batch_size"] = BATCH_AUTO
    elif batch is not None and int(batch) != int(gen.num_candidates):
        out["batch_size"] = int(batch)
    return out
