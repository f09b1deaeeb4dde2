"""Diffusion-DPO loss against an independent float64 computation, for epsilon, v and flow targets."""

from __future__ import annotations

import math

import pytest
import torch

from mpo.loss import DPOOutput, diffusion_dpo_loss, min_snr_weight, split_pairs

KINDS = ("epsilon", "v_prediction", "flow")
# (latent shape, beta, prediction error scale) chosen so that the logits are O(1): both signs occur.
SETTINGS = {
    "epsilon": ((4, 6, 6), 5000.0, 0.03),  # SDXL-like [C, h, w], the paper's SDXL beta
    "v_prediction": ((3, 4, 4, 4), 500.0, 0.1),  # CogVideoX-like [F, C, h, w], the paper's CogVideoX beta
    "flow": ((4, 6, 6), 1000.0, 0.07),
}


def _targets(kind: str, x0_w: torch.Tensor, x0_l: torch.Tensor, noise: torch.Tensor, gen: torch.Generator):
    """Regression targets built from their definitions; winner and loser share noise and timestep."""
    batch = noise.shape[0]
    bshape = (batch,) + (1,) * (noise.dim() - 1)
    if kind == "epsilon":
        return noise.clone(), noise.clone()
    if kind == "v_prediction":
        betas = torch.rand(1000, generator=gen, dtype=torch.float64) * 0.02 + 1e-4
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        alpha = alphas_cumprod[t].sqrt().view(bshape)
        sigma = (1.0 - alphas_cumprod[t]).sqrt().view(bshape)
        return alpha * noise - sigma * x0_w, alpha * noise - sigma * x0_l
    if kind == "flow":
        # x_t = (1 - s) x0 + s noise at sigma s; d x_t / d s = noise - x0 whatever s is.
        return noise - x0_w, noise - x0_l
    raise AssertionError(kind)


def _case(kind: str, batch: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64):
    shape, beta, scale = SETTINGS[kind]
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    x0_w, x0_l, noise = randn(batch, *shape), randn(batch, *shape), randn(batch, *shape)
    y_w, y_l = _targets(kind, x0_w, x0_l, noise, gen)
    preds = [y + scale * randn(batch, *shape) for y in (y_w, y_l, y_w, y_l)]
    tensors = [t.to(dtype) for t in (*preds, y_w, y_l)]
    return tensors, beta


def _reference(pw, pl, rw, rl, yw, yl, beta, weights=None) -> dict[str, list[float]]:
    """Straightforward per-pair computation in Python floats."""

    def mse(pred, target, i):
        diffs = (pred[i] - target[i]).double().reshape(-1).tolist()
        return math.fsum(d * d for d in diffs) / len(diffs)

    out = {k: [] for k in ("per_pair", "inside", "model_diff", "ref_diff", "mse_w", "mse_l")}
    for i in range(pw.shape[0]):
        w = 1.0 if weights is None else float(weights[i])
        m_w, m_l = w * mse(pw, yw, i), w * mse(pl, yl, i)
        r_w, r_l = w * mse(rw, yw, i), w * mse(rl, yl, i)
        inside = -beta / 2 * ((m_w - r_w) - (m_l - r_l))
        out["per_pair"].append(-math.log(1.0 / (1.0 + math.exp(-inside))))
        out["inside"].append(inside)
        out["model_diff"].append(m_w - m_l)
        out["ref_diff"].append(r_w - r_l)
        out["mse_w"].append(m_w)
        out["mse_l"].append(m_l)
    out["loss"] = [math.fsum(out["per_pair"]) / len(out["per_pair"])]
    out["acc"] = [sum(x > 0 for x in out["inside"]) / len(out["inside"])]
    return out


def _assert_matches(result: DPOOutput, ref: dict[str, list[float]], atol: float) -> None:
    pairs = {
        "per_pair": result.per_pair_loss,
        "inside": result.reward_margin,
        "model_diff": result.model_diff,
        "ref_diff": result.ref_diff,
        "mse_w": result.mse_w,
        "mse_l": result.mse_l,
        "loss": result.loss.reshape(1),
        "acc": result.implicit_acc.reshape(1),
    }
    for key, got in pairs.items():
        expected = torch.tensor(ref[key], dtype=torch.float64)
        torch.testing.assert_close(
            got.double(), expected, rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("kind", KINDS)
def test_matches_independent_float64_computation(kind):
    tensors, beta = _case(kind)
    result = diffusion_dpo_loss(*tensors, beta=beta)
    ref = _reference(*tensors, beta)
    assert 0.0 < ref["acc"][0] < 1.0, "test case should contain pairs of both signs"
    _assert_matches(result, ref, atol=1e-10)
    assert result.loss.dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS)
def test_float32_close_to_float64(kind):
    tensors, beta = _case(kind, seed=1)
    ref = _reference(*tensors, beta)
    result = diffusion_dpo_loss(*(t.float() for t in tensors), beta=beta)
    assert result.loss.dtype == torch.float32
    torch.testing.assert_close(
        result.loss.double(), torch.tensor(ref["loss"][0], dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        result.per_pair_loss.double(),
        torch.tensor(ref["per_pair"], dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )


def test_weighting_multiplies_the_squared_errors():
    tensors, beta = _case("v_prediction", batch=5, seed=2)
    weights = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0], dtype=torch.float64)
    result = diffusion_dpo_loss(*tensors, beta=beta, weighting=weights)
    _assert_matches(result, _reference(*tensors, beta, weights=weights), atol=1e-10)
    plain = diffusion_dpo_loss(*tensors, beta=beta)
    torch.testing.assert_close(result.reward_margin, plain.reward_margin * weights, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"weighting must be a scalar or have shape \[5\]"):
        diffusion_dpo_loss(*tensors, beta=beta, weighting=torch.ones(4, dtype=torch.float64))


def test_hand_computed_value_and_sign():
    # The policy fits the winner worse than the reference does (mse_w = 1 vs 0): the logit is
    # -beta/2 = -1, the loss log(1 + e) > log 2, and the pair counts as wrongly ordered.
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    result = diffusion_dpo_loss(one, zero, zero, zero, zero, zero, beta=2.0)
    assert result.reward_margin.item() == pytest.approx(-1.0, abs=1e-15)
    assert result.loss.item() == pytest.approx(math.log1p(math.e), abs=1e-15)
    assert result.implicit_acc.item() == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_wrt_policy_predictions(kind):
    tensors, beta = _case(kind, batch=2, seed=3)
    # Small tensors: crop the latents so that finite differences stay cheap.
    tensors = [t[:, :2, :2].contiguous() for t in tensors]
    pw, pl, rw, rl, yw, yl = tensors
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    weights = torch.tensor([0.7, 1.3], dtype=torch.float64)

    def per_pair(a, b):
        return diffusion_dpo_loss(a, b, rw, rl, yw, yl, beta=beta / 10).per_pair_loss

    def weighted_loss(a, b):
        return diffusion_dpo_loss(a, b, rw, rl, yw, yl, beta=beta / 10, weighting=weights).loss

    assert torch.autograd.gradcheck(per_pair, (pw, pl))
    assert torch.autograd.gradcheck(weighted_loss, (pw, pl))


def test_gradient_pulls_winner_towards_target_and_pushes_loser_away():
    tensors, beta = _case("epsilon", batch=4, seed=4)
    pw, pl, rw, rl, yw, yl = tensors
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    diffusion_dpo_loss(pw, pl, rw, rl, yw, yl, beta=beta).loss.backward()
    # Descending the gradient shrinks the winner's error and grows the loser's, for every pair.
    assert ((pw.grad * (pw - yw)).flatten(1).sum(1) > 0).all()
    assert ((pl.grad * (pl - yl)).flatten(1).sum(1) < 0).all()


def test_reference_and_targets_receive_no_gradient():
    tensors, beta = _case("flow", batch=3, seed=5)
    for t in tensors:
        t.requires_grad_(True)
    pw, pl, rw, rl, yw, yl = tensors
    diffusion_dpo_loss(pw, pl, rw, rl, yw, yl, beta=beta).loss.backward()
    assert pw.grad is not None and pw.grad.abs().sum() > 0
    assert pl.grad is not None and pl.grad.abs().sum() > 0
    assert rw.grad is None and rl.grad is None
    assert yw.grad is None and yl.grad is None


def test_beta_scaling():
    tensors, beta = _case("epsilon", seed=6)
    at_zero = diffusion_dpo_loss(*tensors, beta=0.0)
    assert at_zero.loss.item() == pytest.approx(math.log(2.0), abs=1e-15)
    assert torch.all(at_zero.reward_margin == 0)
    assert at_zero.implicit_acc.item() == 0.0  # a tie is not a correctly ordered pair
    tiny = diffusion_dpo_loss(*tensors, beta=1e-6)
    assert tiny.loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert tiny.loss.item() != math.log(2.0)
    once, twice = diffusion_dpo_loss(*tensors, beta=beta), diffusion_dpo_loss(*tensors, beta=2 * beta)
    torch.testing.assert_close(twice.reward_margin, 2 * once.reward_margin, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        diffusion_dpo_loss(*tensors, beta=-1.0)


def test_swapping_winner_and_loser_flips_the_logit():
    pw, pl, rw, rl, yw, yl = _case("v_prediction", seed=7)[0]
    forward = diffusion_dpo_loss(pw, pl, rw, rl, yw, yl, beta=500.0)
    swapped = diffusion_dpo_loss(pl, pw, rl, rw, yl, yw, beta=500.0)
    torch.testing.assert_close(swapped.reward_margin, -forward.reward_margin, rtol=0, atol=1e-12)
    torch.testing.assert_close(swapped.model_diff, -forward.model_diff, rtol=0, atol=1e-15)
    assert (forward.reward_margin != 0).all()
    assert forward.implicit_acc.item() + swapped.implicit_acc.item() == pytest.approx(1.0)


def test_mean_over_latent_elements_makes_loss_size_independent():
    # Tiling every sample 2x along two latent dims quadruples the element count but not the loss:
    # this is what lets one beta serve every resolution and frame count.
    tensors, beta = _case("epsilon", seed=8)
    tiled = [t.repeat(1, 1, 2, 2) for t in tensors]
    torch.testing.assert_close(
        diffusion_dpo_loss(*tiled, beta=beta).per_pair_loss,
        diffusion_dpo_loss(*tensors, beta=beta).per_pair_loss,
        rtol=1e-12,
        atol=1e-12,
    )


def test_bf16_inputs_give_a_float32_loss_computed_after_upcast():
    tensors, beta = _case("epsilon", seed=9)
    half = [t.to(torch.bfloat16) for t in tensors]
    result = diffusion_dpo_loss(*half, beta=beta)
    assert result.loss.dtype == torch.float32
    assert result.per_pair_loss.dtype == torch.float32
    upcast = diffusion_dpo_loss(*(t.float() for t in half), beta=beta)
    torch.testing.assert_close(result.per_pair_loss, upcast.per_pair_loss, rtol=0, atol=0)
    ref = _reference(*(t.double() for t in half), beta)
    torch.testing.assert_close(
        result.loss.double(), torch.tensor(ref["loss"][0], dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def test_shape_mismatch_names_the_argument():
    tensors, beta = _case("epsilon", batch=2, seed=10)
    tensors[3] = tensors[3][:, :2]
    with pytest.raises(ValueError, match="ref_pred_l"):
        diffusion_dpo_loss(*tensors, beta=beta)


def test_split_pairs_of_a_stacked_forward():
    winners = torch.randn(3, 2, 4, 4)
    losers = torch.randn(3, 2, 4, 4)
    got_w, got_l = split_pairs(torch.cat([winners, losers]))
    assert torch.equal(got_w, winners) and torch.equal(got_l, losers)
    with pytest.raises(ValueError, match=r"\[2B, \.\.\.\]"):
        split_pairs(torch.randn(5, 2))


def test_scalars_are_detached_batch_means():
    tensors, beta = _case("flow", batch=4, seed=11)
    tensors[0].requires_grad_(True)
    result = diffusion_dpo_loss(*tensors, beta=beta)
    scalars = result.scalars()
    assert set(scalars) == {f for f in DPOOutput.__dataclass_fields__}
    assert all(v.dim() == 0 and not v.requires_grad for v in scalars.values())
    assert scalars["mse_w"].item() == pytest.approx(result.mse_w.mean().item())


def _variant_reference(tensors, beta, loss_type, sft_weight, weights=None) -> list[float]:
    """Per-pair losses of the variants from their formulas, in Python floats."""
    ref = _reference(*tensors, beta, weights=weights)
    out = []
    for inside, mse_w in zip(ref["inside"], ref["mse_w"]):
        if loss_type == "sigmoid":
            ell = math.log1p(math.exp(-inside))
        elif loss_type == "hinge":
            ell = max(0.0, 1.0 - inside)
        else:  # IPO: (h - 1/(2 tau))^2 with h = inside / beta, tau = beta, times beta^2
            ell = beta**2 * (inside / beta - 1.0 / (2.0 * beta)) ** 2
        out.append(ell + sft_weight * mse_w)
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_loss_variants_and_sft_term_match_their_formulas_in_float64(loss_type, sft_weight):
    tensors, beta = _case("v_prediction", seed=12)
    beta *= 10  # margins from -5 to 3: both sides of the hinge, the sigmoid far from linear
    weights = torch.linspace(0.3, 1.7, tensors[0].shape[0], dtype=torch.float64)
    result = diffusion_dpo_loss(
        *tensors, beta=beta, weighting=weights, loss_type=loss_type, sft_weight=sft_weight
    )
    expected = _variant_reference(tensors, beta, loss_type, sft_weight, weights)
    torch.testing.assert_close(
        result.per_pair_loss, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-10
    )
    assert result.loss.item() == pytest.approx(math.fsum(expected) / len(expected), abs=1e-12)
    hinge_active = [1.0 - m for m in _reference(*tensors, beta, weights=weights)["inside"]]
    if loss_type == "hinge":
        assert min(hinge_active) < 0 < max(hinge_active), "the case should cover both sides of the hinge"


def test_loss_variants_at_a_zero_margin():
    tensors, beta = _case("epsilon", seed=13)
    for loss_type, value in (("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 0.25)):
        at_zero = diffusion_dpo_loss(*tensors, beta=0.0, loss_type=loss_type)
        assert at_zero.loss.item() == pytest.approx(value, abs=1e-15), loss_type
    with pytest.raises(ValueError, match=r"train\.loss_type='dpo'"):
        diffusion_dpo_loss(*tensors, beta=beta, loss_type="dpo")
    with pytest.raises(ValueError, match="sft_weight must be >= 0"):
        diffusion_dpo_loss(*tensors, beta=beta, sft_weight=-1.0)


def test_sft_term_pulls_the_winner_towards_its_target_only():
    tensors, beta = _case("epsilon", batch=4, seed=14)
    pw, pl, rw, rl, yw, yl = tensors
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    plain = diffusion_dpo_loss(pw, pl, rw, rl, yw, yl, beta=beta)
    with_sft = diffusion_dpo_loss(pw, pl, rw, rl, yw, yl, beta=beta, sft_weight=2.0)
    g_plain = torch.autograd.grad(plain.loss, (pw, pl))
    g_sft = torch.autograd.grad(with_sft.loss, (pw, pl))
    # d/dpw of 2 * mean_pairs(mean((pw - yw)^2)) = 2 * 2 (pw - yw) / (numel per pair * pairs)
    numel = pw[0].numel()
    torch.testing.assert_close(
        g_sft[0] - g_plain[0], 4.0 * (pw - yw).detach() / (numel * 4), rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(g_sft[1], g_plain[1], rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_matches_its_formula_in_float64(prediction_type):
    gen = torch.Generator().manual_seed(15)
    betas = torch.rand(1000, generator=gen, dtype=torch.float64) * 0.02 + 1e-4
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod[-1] = 0.0  # a zero-terminal-SNR schedule's last step (CogVideoX)
    timesteps = torch.tensor([0, 10, 100, 400, 999])
    gamma = 5.0
    got = min_snr_weight(alphas_cumprod, timesteps, gamma, prediction_type)
    expected = []
    for t in timesteps.tolist():
        abar = float(alphas_cumprod[t])
        snr = abar / (1.0 - abar)
        if prediction_type == "epsilon":
            expected.append(1.0 if snr <= gamma else gamma / snr)
        else:
            expected.append(min(snr, gamma) / (snr + 1.0))
    assert got.dtype == torch.float32
    assert got.double().tolist() == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert any(w < 1.0 for w in expected) and (prediction_type == "v_prediction") == (expected[-1] == 0.0)
    with pytest.raises(ValueError, match="flow"):
        min_snr_weight(alphas_cumprod, timesteps, gamma, "flow")
