"""Training noise schedules: the forward process, the regression target, the timestep the denoiser is
fed, how training timesteps are drawn, and the per-sample loss weight.

Two kinds cover the field:

- :class:`DDPMSchedule` (SDXL: epsilon; CogVideoX: v-prediction) wraps the checkpoint's own diffusers
  scheduler, so its ``alphas_cumprod`` (with CogVideoX's SNR shift and zero terminal SNR) is exactly
  the checkpoint's: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; target eps, or
  ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``.
- :class:`FlowMatchSchedule` (SD3, FLUX, Wan: rectified flow): ``x_t = (1 - sigma) x0 + sigma eps``, the
  target is the velocity ``eps - x0``, and the denoiser is fed ``sigma * N``, as in diffusers'
  flow-matching pipelines. The training sigmas are the checkpoint scheduler's, shifted by its
  ``shift`` (SD3: 3.0; Wan: ``flow_shift``, 3.0 at 480p) as diffusers' ``FlowMatchEulerDiscreteScheduler``
  shifts them: ``sigma = shift s / (1 + (shift - 1) s)`` with ``s = (k + 1) / N``. A scheduler that
  shifts by resolution at sampling time (FLUX.1: ``use_dynamic_shifting``) gives the unshifted table
  here; the FLUX family then trains with the shift its pipeline samples the recipe's resolution with.
  Sampling never uses this table: each pipeline samples with its own scheduler and its own sigmas.

Conventions shared by both
- A training timestep is an integer index ``k`` in ``[0, N)``, N = ``num_train_timesteps``; larger is
  noisier. ``train.timestep_range`` selects a fraction of that range, ``train.timestep_sampling`` the
  density over it (uniform; ``logit_normal`` and ``mode`` from the SD3 paper, section 3.1).
- Arithmetic is float32 whatever the latents' dtype (``abar`` near 1 is not representable in bf16), and
  the result is returned in the latents' dtype.
- ``loss_weight`` is the per-sample factor ``omega(t)`` that multiplies each squared error (paper eq.
  2), ``train.loss_weighting``: ``"none"`` (the Diffusion-DPO convention) returns None; a DDPM
  schedule defines ``min_snr`` (min-SNR-gamma, ``train.snr_gamma``), a flow schedule ``sigma_sqrt``
  and ``cosmap`` (the SD3 paper's weightings). Each schedule lists its own in ``loss_weightings``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from mpo.schema import TIMESTEP_SAMPLING

if TYPE_CHECKING:
    from mpo.schema import TrainConfig

PredictionType = Literal["epsilon", "v_prediction", "flow"]


def timestep_bounds(
    timestep_range: list[float] | tuple[float, float], num_train_timesteps: int
) -> tuple[int, int]:
    """``train.timestep_range`` (fractions of the schedule) to integer bounds ``[low, high)``."""
    if len(timestep_range) != 2:
        raise ValueError(f"train.timestep_range={list(timestep_range)}: expected [low, high]")
    lo, hi = (float(x) for x in timestep_range)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"train.timestep_range={[lo, hi]}: need 0 <= low < high <= 1")
    low = int(lo * num_train_timesteps)
    return low, max(low + 1, round(hi * num_train_timesteps))


@dataclass(frozen=True)
class TimestepSampler:
    """Draws the training timestep index of one stream position from its private generator.

    A small frozen value (no model inside), so the data loader's worker processes can receive it.
    The non-uniform densities are diffusers' ``compute_density_for_timestep_sampling`` on [0, 1),
    mapped linearly onto ``[low, high)``.
    """

    low: int
    high: int
    density: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.density not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"train.timestep_sampling={self.density!r}: must be one of {list(TIMESTEP_SAMPLING)}"
            )
        if not 0 <= self.low < self.high:
            raise ValueError(f"timestep bounds [{self.low}, {self.high}) are empty")

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        """One index, a 0-dim int64 tensor."""
        if self.density == "uniform":
            return torch.randint(self.low, self.high, (), generator=generator)
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.density,
            1,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )[0]
        width = self.high - self.low
        return (self.low + (u * width).long().clamp(0, width - 1)).reshape(())


class TrainingSchedule(ABC):
    """What the trainer needs of a noise schedule; a backbone holds one and delegates to it."""

    prediction_type: PredictionType
    loss_weightings: ClassVar[tuple[str, ...]] = ("none",)

    @property
    @abstractmethod
    def num_train_timesteps(self) -> int: ...

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process q(x_t | x_0) at integer ``timesteps`` ``[B]``."""

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target of ``prediction_type``."""

    @abstractmethod
    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser receives for training indices ``timesteps`` (the pipeline's convention)."""

    @abstractmethod
    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 at ``timesteps``, float32 ``[B]``."""

    def loss_weight(
        self, timesteps: torch.Tensor, scheme: str = "none", gamma: float = 5.0
    ) -> torch.Tensor | None:
        """Per-pair weight ``omega_t`` ``[B]`` of the squared errors (float32), or None for a constant
        weight; ``gamma`` is ``train.snr_gamma`` (min_snr)."""
        if scheme not in self.loss_weightings:
            raise ValueError(
                f"train.loss_weighting={scheme!r} is not defined for a {type(self).__name__}; "
                f"allowed: {list(self.loss_weightings)}"
            )
        return None

    def timestep_sampler(self, train: TrainConfig, bounds: tuple[int, int] | None = None) -> TimestepSampler:
        """The sampler the recipe asks for (``train.timestep_range`` / ``timestep_sampling`` / ``logit_*``),
        optionally narrowed to ``bounds`` (e.g. the noise range of one expert of a two-expert model)."""
        low, high = timestep_bounds(list(train.timestep_range), self.num_train_timesteps)
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
            if low >= high:
                raise ValueError(
                    f"train.timestep_range={list(train.timestep_range)} does not overlap the trained "
                    f"denoiser's timesteps [{bounds[0]}, {bounds[1]}) of {self.num_train_timesteps}"
                )
        return TimestepSampler(
            low,
            high,
            density=getattr(train, "timestep_sampling", "uniform"),
            logit_mean=float(getattr(train, "logit_mean", 0.0)),
            logit_std=float(getattr(train, "logit_std", 1.0)),
            mode_scale=float(getattr(train, "mode_scale", 1.29)),
        )


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` values broadcast against ``[B, ...]`` latents."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


class DDPMSchedule(TrainingSchedule):
    """A discrete DDPM schedule held by the checkpoint's diffusers scheduler (anything with
    ``alphas_cumprod``, ``add_noise`` and ``get_velocity``: DDPM, DDIM, Euler, CogVideoX-DDIM).

    Loss weighting: min-SNR-gamma (:func:`mpo.loss.min_snr_weight`, for epsilon and v)."""

    loss_weightings: ClassVar[tuple[str, ...]] = ("none", "min_snr")

    def __init__(self, scheduler: Any) -> None:
        kind = scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type={kind!r} is not supported (epsilon, v_prediction)")
        self.prediction_type = kind
        # A private object: diffusers schedulers cache tensors on whatever device they last saw.
        self.scheduler = scheduler

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def _on(self, device: torch.device) -> Any:
        """The scheduler with its ``alphas_cumprod`` on ``device``: diffusers copies it there on every
        call otherwise (CogVideoX's scheduler), a host-to-device copy that syncs each step."""
        if self.scheduler.alphas_cumprod.device != device:
            self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        return self.scheduler

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # float32 arithmetic: alphas_cumprod near 1 is not representable in bfloat16.
        scheduler = self._on(latents.device)
        noisy = scheduler.add_noise(latents.float(), noise.float(), timesteps.to(latents.device))
        return noisy.to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        scheduler = self._on(latents.device)
        velocity = scheduler.get_velocity(latents.float(), noise.float(), timesteps.to(latents.device))
        return velocity.to(latents.dtype)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps  # the UNet / transformer embeds the integer timestep itself

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        abar = self._on(timesteps.device).alphas_cumprod.to(torch.float32)[timesteps]
        return abar / (1 - abar)

    def loss_weight(
        self, timesteps: torch.Tensor, scheme: str = "none", gamma: float = 5.0
    ) -> torch.Tensor | None:
        super().loss_weight(timesteps, scheme, gamma)  # validates the name
        if scheme == "none":
            return None
        from mpo.loss import min_snr_weight

        return min_snr_weight(
            self._on(timesteps.device).alphas_cumprod, timesteps, gamma, self.prediction_type
        )


class FlowMatchSchedule(TrainingSchedule):
    """Rectified flow with a shifted sigma table (see the module docstring)."""

    prediction_type: PredictionType = "flow"
    # SD3 paper / diffusers' SD3 training: 1 / sigma^2, and the cosine-map density as a weight.
    loss_weightings: ClassVar[tuple[str, ...]] = ("none", "sigma_sqrt", "cosmap")

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        if num_train_timesteps < 1 or not shift > 0:
            raise ValueError(
                f"flow schedule needs num_train_timesteps >= 1 and shift > 0, got {num_train_timesteps}, {shift}"
            )
        self._n = int(num_train_timesteps)
        self.shift = float(shift)
        s = torch.arange(1, self._n + 1, dtype=torch.float64) / self._n
        self.sigmas = (self.shift * s / (1 + (self.shift - 1) * s)).float()  # [N], increasing to 1

    @classmethod
    def from_scheduler_config(cls, config: Any) -> FlowMatchSchedule:
        """The training schedule of a checkpoint's flow scheduler config (FlowMatchEuler or UniPC with
        flow sigmas): its ``num_train_timesteps`` and ``shift`` / ``flow_shift``; no shift where it
        shifts by resolution at sampling time."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        if get("use_dynamic_shifting", False):
            shift = 1.0
        else:
            shift = get("shift", None) or get("flow_shift", None) or 1.0
        return cls(get("num_train_timesteps", 1000), shift)

    @property
    def num_train_timesteps(self) -> int:
        return self._n

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise level of each index, float32 ``[B]`` (the table moves to the indices' device once,
        not with a host-to-device copy every step)."""
        if self.sigmas.device != timesteps.device:
            self.sigmas = self.sigmas.to(timesteps.device)
        return self.sigmas[timesteps.long()]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = _per_sample(self.sigma(timesteps.to(latents.device)), latents)
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return (noise.float() - latents.float()).to(latents.dtype)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.sigma(timesteps) * self._n

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(timesteps)
        return ((1 - sigma) / sigma).square()

    def loss_weight(
        self, timesteps: torch.Tensor, scheme: str = "none", gamma: float = 5.0
    ) -> torch.Tensor | None:
        super().loss_weight(timesteps, scheme, gamma)  # validates the name
        if scheme == "none":
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(scheme, self.sigma(timesteps)).float()
