"""Diffusion-DPO loss (VisionReward paper, eq. 2; Wallace et al., "Diffusion Model Alignment Using Direct
Preference Optimization"), its variants, and the timestep weighting that goes with them.

For a preference pair (winner w, loser l) noised with the same noise and timestep, with the policy
prediction ``p``, the frozen reference prediction ``r`` and the regression target ``y`` of the
backbone's parameterisation::

    mse_w     = omega_t * mean((p_w - y_w)^2)        ref_mse_w = omega_t * mean((r_w - y_w)^2)
    mse_l     = omega_t * mean((p_l - y_l)^2)        ref_mse_l = omega_t * mean((r_l - y_l)^2)
    m         = -beta / 2 * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))       (the reward margin)
    loss      = mean over pairs of  ell(m) + sft_weight * mse_w

with the preference loss ``ell`` chosen by ``train.loss_type``:

    sigmoid   ell(m) = -log sigmoid(m)        Diffusion-DPO (eq. 2); log 2 at m = 0
    hinge     ell(m) = max(0, 1 - m)          SLiC-style hinge on the margin (TRL's "hinge"); 1 at m = 0
    ipo       ell(m) = (m - 1/2)^2            IPO (Azar et al. 2023, eq. 17) with tau = beta, times
                                              beta^2; 1/4 at m = 0

IPO regresses the implicit log-ratio difference h = m / beta onto 1 / (2 tau); written in the margin
with tau = beta it is beta^2 (h - 1/(2 beta))^2 = (m - 1/2)^2. The factor beta^2 keeps its gradient at
m = 0 (-1) on the scale of the sigmoid loss's (-1/2), so one learning rate serves every loss type
(Adam is nearly scale-free anyway). ``sft_weight * mse_w`` is the plain denoising loss on the winner
(the diffusion analogue of the SFT / NLL term added to DPO by RPO, Pang et al. 2024); 0 turns it off.

``omega_t`` is the per-pair timestep weight (eq. 2's ``omega(lambda_t)``), 1 unless ``train.loss_weighting``
asks for another, from the family's training schedule (``Backbone.loss_weight``, mpo/backbones/schedules.py):
:func:`min_snr_weight` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
eq. 10 and its v-prediction form) for the DDPM families, the SD3 paper's ``sigma_sqrt`` / ``cosmap`` for
the flow-matching ones. Winner and loser share their timestep, so
the weight scales the pair's margin like a per-timestep beta.

Conventions, and where they depart from the letter of eq. 2:

- The squared error is a *mean* over every latent element (all dims but the batch), not the sum
  ``||.||_2^2``; eq. 2's ``T * omega(lambda_t)`` and the factor between the ELBO and the denoising error
  are folded into the single constant ``beta / 2``. This is the convention of the public Diffusion-DPO
  training code, so the paper's beta values (5000 for SDXL, 500 for CogVideoX) carry over unchanged,
  whatever the resolution or number of frames (the mean does not grow with the latent size).
- The loss is target-agnostic: epsilon (SDXL), v-prediction (CogVideoX) and flow-matching velocity
  (SD3, FLUX, Wan) only differ in ``y``, which the backbone computes (``Backbone.target``).
- The error is computed in float32 (float64 stays float64) even when the predictions are bf16/fp16:
  the four errors are nearly equal and their differences, multiplied by beta in the thousands, would
  be lost to bf16 rounding.
- The reference predictions and targets are constants of the objective: they are detached here, so a
  caller that forgets ``torch.no_grad()`` for the reference pass still trains only the policy.
- The reference enters only through its two errors per pair, so they can be computed once, before
  training, and read back (``train.reference: precomputed``, :func:`dpo_loss_from_errors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES",
    "DPOOutput",
    "diffusion_dpo_loss",
    "dpo_loss_from_errors",
    "min_snr_weight",
    "per_sample_mse",
    "preference_loss",
    "split_pairs",
]

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class DPOOutput:
    """The loss and what a training log wants to show about it. Per-pair tensors have shape ``[B]``."""

    loss: torch.Tensor  # scalar, mean of per_pair_loss; the only field with a graph
    per_pair_loss: torch.Tensor  # ell(reward_margin) + sft_weight * mse_w
    implicit_acc: torch.Tensor  # scalar: fraction of pairs whose reward_margin is > 0
    model_diff: torch.Tensor  # mse_w - mse_l of the policy (negative: policy fits the winner better)
    ref_diff: torch.Tensor  # ref_mse_w - ref_mse_l of the reference
    reward_margin: torch.Tensor  # the margin m = -beta/2 * (model_diff - ref_diff)
    mse_w: torch.Tensor
    mse_l: torch.Tensor
    ref_mse_w: torch.Tensor
    ref_mse_l: torch.Tensor

    def scalars(self) -> dict[str, torch.Tensor]:
        """Batch means of every field, detached, for logging (no host sync until the caller asks).
        Four kernels for the ten fields (the per-pair ones are stacked and averaged together): the
        trainer calls this every micro-step."""
        fields = vars(self)
        per_pair = [n for n, v in fields.items() if v.dim() == 1]
        whole = [n for n, v in fields.items() if v.dim() == 0]
        means = torch.stack([fields[n].detach() for n in per_pair]).float().mean(dim=1)
        values = torch.cat([means, torch.stack([fields[n].detach() for n in whole]).float()])
        return dict(zip(per_pair + whole, values.unbind()))


def split_pairs(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stacked ``[2B, ...]`` forward into (winners ``[B, ...]``, losers ``[B, ...]``).

    The trainer runs winners and losers through the denoiser as one batch (one forward, one set of
    activations), with rows ``[0:B]`` the winners and ``[B:2B]`` the losers.
    """
    if pred.dim() == 0 or pred.shape[0] % 2:
        raise ValueError(
            f"split_pairs: expected a stacked batch [2B, ...] (winners then losers), got shape {tuple(pred.shape)}"
        )
    winners, losers = pred.chunk(2, dim=0)
    return winners, losers


def per_sample_mse(
    pred: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Mean squared error over every dim but the batch, ``[N]``, computed after upcasting to ``dtype``
    (default: float32, or float64 when an input is float64). The target is a constant."""
    if dtype is None:
        dtype = torch.promote_types(torch.promote_types(torch.float32, pred.dtype), target.dtype)
    err = pred.to(dtype) - target.detach().to(dtype)
    return err.square().flatten(1).mean(dim=1)


def preference_loss(margin: torch.Tensor, loss_type: str = "sigmoid") -> torch.Tensor:
    """``ell(m)`` of the module docstring, per pair."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(margin)
    if loss_type == "hinge":
        return torch.relu(1.0 - margin)
    if loss_type == "ipo":
        return (margin - 0.5).square()
    raise ValueError(f"train.loss_type={loss_type!r} is not one of {list(LOSS_TYPES)}")


def min_snr_weight(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma weight of each timestep, ``[B]`` float32, from the schedule's ``alphas_cumprod``.

    With SNR(t) = abar_t / (1 - abar_t) (Hang et al. 2023, eq. 10, and the form for v-prediction)::

        epsilon        omega_t = min(SNR, gamma) / SNR       (1 where SNR <= gamma, also at SNR = 0)
        v_prediction   omega_t = min(SNR, gamma) / (SNR + 1)

    It only needs the training schedule's cumulative alphas, so it goes wherever the schedule goes.
    A zero-terminal-SNR schedule (CogVideoX) gives SNR = 0 at its last timestep: weight 1 for epsilon
    (the limit), 0 for v (the v target there is -x0 and the formula's own value).
    """
    if gamma <= 0:
        raise ValueError(f"train.snr_gamma={gamma}: must be > 0")
    abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    snr = abar / (1.0 - abar)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        weight = torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))
    elif prediction_type == "v_prediction":
        weight = clipped / (snr + 1.0)
    else:
        raise ValueError(
            f"min-SNR weighting is defined for epsilon and v_prediction targets, not {prediction_type!r}"
        )
    return weight.float()


def diffusion_dpo_loss(
    model_pred_w: torch.Tensor,
    model_pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    beta: float,
    weighting: torch.Tensor | None = None,
    *,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
) -> DPOOutput:
    """Diffusion-DPO loss of a batch of ``B`` pairs (eq. 2, conventions in the module docstring).

    All six tensors have the same shape ``[B, *latent_shape]``. ``beta`` >= 0 is the KL strength
    (0 gives the constant loss ell(0): log 2 for the sigmoid loss).

    weighting: optional per-pair factor ``[B]`` (or a scalar) that multiplies every squared error,
        i.e. eq. 2's ``omega(lambda_t)``. Winner and loser share their timestep, so it scales each
        pair's logit like a per-timestep beta. Leave it ``None`` (constant weight, what the paper and the
        public Diffusion-DPO runs use); set it to reweight timesteps, e.g. :func:`min_snr_weight`, or a
        flow-matching density weight. With a weighting, every error field of the output is the
        weighted one.
    loss_type, sft_weight: the preference loss ``ell`` and the weight of the winner's denoising loss.
    """
    named = {
        "model_pred_w": model_pred_w,
        "model_pred_l": model_pred_l,
        "ref_pred_w": ref_pred_w,
        "ref_pred_l": ref_pred_l,
        "target_w": target_w,
        "target_l": target_l,
    }
    shape = model_pred_w.shape
    bad = {name: tuple(t.shape) for name, t in named.items() if t.shape != shape}
    if bad or model_pred_w.dim() < 1 or shape[0] == 0:
        raise ValueError(
            f"diffusion_dpo_loss: all predictions and targets must share one non-empty shape [B, ...]; "
            f"model_pred_w is {tuple(shape)}, mismatching: {bad or 'none'}"
        )
    dtype = torch.float32
    for tensor in named.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dpo_loss_from_errors(
        per_sample_mse(model_pred_w, target_w, dtype),
        per_sample_mse(model_pred_l, target_l, dtype),
        per_sample_mse(ref_pred_w.detach(), target_w, dtype),
        per_sample_mse(ref_pred_l.detach(), target_l, dtype),
        beta,
        weighting,
        loss_type=loss_type,
        sft_weight=sft_weight,
    )


def dpo_loss_from_errors(
    mse_w: torch.Tensor,
    mse_l: torch.Tensor,
    ref_mse_w: torch.Tensor,
    ref_mse_l: torch.Tensor,
    beta: float,
    weighting: torch.Tensor | None = None,
    *,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
) -> DPOOutput:
    """The loss from the four unweighted per-pair errors ``[B]`` (:func:`per_sample_mse` of the policy
    and of the reference): what :func:`diffusion_dpo_loss` computes after its errors, and what a run
    with precomputed reference errors computes from the stored ones."""
    if beta < 0:
        raise ValueError(f"diffusion_dpo_loss: beta must be >= 0, got {beta}")
    if sft_weight < 0:
        raise ValueError(f"diffusion_dpo_loss: sft_weight must be >= 0, got {sft_weight}")
    errors = (mse_w, mse_l, ref_mse_w, ref_mse_l)
    if any(e.dim() != 1 or e.shape != mse_w.shape for e in errors):
        raise ValueError(
            f"dpo_loss_from_errors: the four errors must share one shape [B], got {[tuple(e.shape) for e in errors]}"
        )
    ref_mse_w, ref_mse_l = ref_mse_w.detach().to(mse_w.dtype), ref_mse_l.detach().to(mse_w.dtype)
    if weighting is not None:
        batch = mse_w.shape[0]
        if weighting.dim() > 1 or (weighting.dim() == 1 and weighting.shape[0] != batch):
            raise ValueError(
                f"diffusion_dpo_loss: weighting must be a scalar or have shape [{batch}], "
                f"got {tuple(weighting.shape)}"
            )
        weight = weighting.detach().to(device=mse_w.device, dtype=mse_w.dtype)
        mse_w, mse_l, ref_mse_w, ref_mse_l = (weight * e for e in (mse_w, mse_l, ref_mse_w, ref_mse_l))

    model_diff = mse_w - mse_l
    ref_diff = ref_mse_w - ref_mse_l
    reward_margin = -0.5 * beta * (model_diff - ref_diff)
    per_pair_loss = preference_loss(reward_margin, loss_type)
    if sft_weight:
        per_pair_loss = per_pair_loss + sft_weight * mse_w

    return DPOOutput(
        loss=per_pair_loss.mean(),
        per_pair_loss=per_pair_loss,
        implicit_acc=(reward_margin > 0).to(mse_w.dtype).mean(),
        model_diff=model_diff,
        ref_diff=ref_diff,
        reward_margin=reward_margin,
        mse_w=mse_w,
        mse_l=mse_l,
        ref_mse_w=ref_mse_w,
        ref_mse_l=ref_mse_l,
    )
