"""Diffusion-DPO loss (VisionReward paper, eq. 2; Wallace et al., "Diffusion Model Alignment Using Direct
Preference Optimization").

For a preference pair (winner w, loser l) noised with the same noise and timestep, with the policy
prediction ``p``, the frozen reference prediction ``r`` and the regression target ``y`` of the
backbone's parameterisation::

    mse_w     = mean((p_w - y_w)^2)        ref_mse_w = mean((r_w - y_w)^2)
    mse_l     = mean((p_l - y_l)^2)        ref_mse_l = mean((r_l - y_l)^2)
    inside    = -beta / 2 * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))
    loss      = mean over pairs of -log sigmoid(inside)

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DPOOutput", "diffusion_dpo_loss", "split_pairs"]


@dataclass
class DPOOutput:
    """The loss and what a training log wants to show about it. Per-pair tensors have shape ``[B]``."""

    loss: torch.Tensor  # scalar, mean of per_pair_loss; the only field with a graph
    per_pair_loss: torch.Tensor  # -log sigmoid(reward_margin)
    implicit_acc: torch.Tensor  # scalar: fraction of pairs whose reward_margin is > 0
    model_diff: torch.Tensor  # mse_w - mse_l of the policy (negative: policy fits the winner better)
    ref_diff: torch.Tensor  # ref_mse_w - ref_mse_l of the reference
    reward_margin: torch.Tensor  # the logit inside the sigmoid: -beta/2 * (model_diff - ref_diff)
    mse_w: torch.Tensor
    mse_l: torch.Tensor
    ref_mse_w: torch.Tensor
    ref_mse_l: torch.Tensor

    def scalars(self) -> dict[str, torch.Tensor]:
        """Batch means of every field, detached, for logging (no host sync until the caller asks)."""
        return {name: value.detach().float().mean() for name, value in vars(self).items()}


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


def diffusion_dpo_loss(
    model_pred_w: torch.Tensor,
    model_pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    beta: float,
    weighting: torch.Tensor | None = None,
) -> DPOOutput:
    """Diffusion-DPO loss of a batch of ``B`` pairs (eq. 2, conventions in the module docstring).

    All six tensors have the same shape ``[B, *latent_shape]``. ``beta`` >= 0 is the KL strength
    (0 gives the constant loss log 2).

    weighting: optional per-pair factor ``[B]`` (or a scalar) that multiplies every squared error,
        i.e. eq. 2's ``omega(lambda_t)``. Winner and loser share their timestep, so it scales each
        pair's logit like a per-timestep beta. Leave it ``None`` (constant weight, what the paper and the
        public Diffusion-DPO runs use); set it to reweight timesteps, e.g. an SNR-based weight when
        sampling timesteps non-uniformly, or a flow-matching density weight. With a weighting, every
        error field of the output is the weighted one.
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
    if beta < 0:
        raise ValueError(f"diffusion_dpo_loss: beta must be >= 0, got {beta}")

    dtype = torch.float32
    for tensor in named.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    mse_w = _per_sample_mse(model_pred_w, target_w, dtype)
    mse_l = _per_sample_mse(model_pred_l, target_l, dtype)
    ref_mse_w = _per_sample_mse(ref_pred_w.detach(), target_w, dtype)
    ref_mse_l = _per_sample_mse(ref_pred_l.detach(), target_l, dtype)

    if weighting is not None:
        batch = shape[0]
        if weighting.dim() > 1 or (weighting.dim() == 1 and weighting.shape[0] != batch):
            raise ValueError(
                f"diffusion_dpo_loss: weighting must be a scalar or have shape [{batch}], "
                f"got {tuple(weighting.shape)}"
            )
        weight = weighting.detach().to(device=mse_w.device, dtype=dtype)
        mse_w, mse_l, ref_mse_w, ref_mse_l = (weight * e for e in (mse_w, mse_l, ref_mse_w, ref_mse_l))

    model_diff = mse_w - mse_l
    ref_diff = ref_mse_w - ref_mse_l
    reward_margin = -0.5 * beta * (model_diff - ref_diff)
    per_pair_loss = -F.logsigmoid(reward_margin)

    return DPOOutput(
        loss=per_pair_loss.mean(),
        per_pair_loss=per_pair_loss,
        implicit_acc=(reward_margin > 0).to(dtype).mean(),
        model_diff=model_diff,
        ref_diff=ref_diff,
        reward_margin=reward_margin,
        mse_w=mse_w,
        mse_l=mse_l,
        ref_mse_w=ref_mse_w,
        ref_mse_l=ref_mse_l,
    )


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean squared error over every dim but the batch, computed in ``dtype`` (upcast first)."""
    err = pred.to(dtype) - target.detach().to(dtype)
    return err.square().flatten(1).mean(dim=1)
