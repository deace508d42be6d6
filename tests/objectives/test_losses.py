"""The loss family against independent implementations (fp64, values and gradients) and against TRL's code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from open_instruct.config import TrainArguments, validate
from open_instruct.errors import UserError
from open_instruct.objectives.losses import LOSSES, LossSettings, PreferenceLogps, get_loss, wpo_weights
from tests.trl_helpers import fused_head_model, trl_compute_loss

# open-instruct's seven losses; TRL's others are checked in tests/objectives/test_losses_trl.py
OPEN_INSTRUCT = ("dpo", "dpo_norm", "robust", "ipo", "hinge", "simpo", "wpo")

SETTINGS = [
    LossSettings(beta=0.1),
    LossSettings(beta=2.0, label_smoothing=0.2, gamma_beta_ratio=0.5),
    LossSettings(beta=0.5, label_smoothing=0.45, gamma_beta_ratio=0.0),
]


def random_logps(batch: int, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Random per-pair inputs that require grad: sums in [-60, -1], means in [-3, -0.05], reference sums likewise."""
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(batch, generator=g, dtype=dtype)).requires_grad_()

    return {
        "pc": u(-60, -1),
        "pr": u(-60, -1),
        "rc": u(-60, -1),
        "rr": u(-60, -1),
        "mc": u(-3, -0.05),
        "mr": u(-3, -0.05),
    }


def as_logps(v: dict[str, torch.Tensor]) -> PreferenceLogps:
    return PreferenceLogps(v["pc"], v["pr"], v["rc"], v["rr"], v["mc"], v["mr"])


# ---- independent implementations: per pair, from the papers' formulas, with log(1 + exp) instead of logsigmoid ----


def _neg_log_sigmoid(h):
    return torch.log1p(torch.exp(-h)) if h >= 0 else -h + torch.log1p(torch.exp(h))


def _margin(v, i):
    return (v["pc"][i] - v["rc"][i]) - (v["pr"][i] - v["rr"][i])


def independent(name: str, v: dict[str, torch.Tensor], s: LossSettings) -> torch.Tensor:
    """Per-pair losses ``[B]`` computed element by element."""
    out = []
    for i in range(v["pc"].shape[0]):
        eps, beta = s.label_smoothing, s.beta
        if name in ("dpo", "dpo_norm", "wpo"):
            h = beta * _margin(v, i)
            value = (1 - eps) * _neg_log_sigmoid(h) + eps * _neg_log_sigmoid(-h)
            if name == "wpo":
                # weight = geometric-mean token probability of chosen times that of rejected, no gradient
                value = value * (math.exp(v["mc"][i].item()) * math.exp(v["mr"][i].item()))
        elif name == "robust":
            h = beta * _margin(v, i)
            value = ((1 - eps) * _neg_log_sigmoid(h) - eps * _neg_log_sigmoid(-h)) / (1 - 2 * eps)
        elif name == "ipo":
            value = (_margin(v, i) - 1 / (2 * beta)) ** 2
        elif name == "hinge":
            value = torch.clamp(1 - beta * _margin(v, i), min=0)
        elif name == "simpo":
            gamma = s.gamma_beta_ratio * beta
            h = beta * v["pc"][i] - beta * v["pr"][i] - gamma
            value = (1 - eps) * _neg_log_sigmoid(h) + eps * _neg_log_sigmoid(-h)
        value = value + s.nll_loss_weight * -v["mc"][i]
        out.append(value)
    return torch.stack(out)


def _grads(losses: torch.Tensor, v: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(losses.sum(), list(v.values()), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, v.values())]


@pytest.mark.parametrize("name", OPEN_INSTRUCT)
@pytest.mark.parametrize("settings", SETTINGS + [LossSettings(beta=0.3, label_smoothing=0.1, nll_loss_weight=0.7)])
def test_loss_matches_independent_implementation(name, settings):
    fn, _ = get_loss(name)
    for batch, seed in ((1, 0), (5, 1), (16, 2)):
        v = random_logps(batch, seed)
        if name == "hinge":  # straddle the kink so both branches are exercised
            with torch.no_grad():
                v["pc"].copy_(
                    v["rc"]
                    + v["pr"]
                    - v["rr"]
                    + torch.linspace(-3, 3, batch, dtype=torch.float64) / settings.beta
                    + 0.0123
                )
        ours = fn(as_logps(v), settings).losses
        theirs = independent(name, v, settings)
        assert ours.shape == (batch,) and ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        for g_ours, g_theirs in zip(_grads(ours, v), _grads(theirs, v)):
            torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", OPEN_INSTRUCT)
def test_loss_gradients_match_finite_differences(name):
    fn, _ = get_loss(name)
    settings = LossSettings(beta=0.7, label_smoothing=0.0 if name in ("ipo", "hinge") else 0.15, nll_loss_weight=0.3)
    v = random_logps(3, 7)
    # gradcheck perturbs every input; the WPO weight is detached by design, so leave the means out of it there
    keys = [k for k in v if not (name == "wpo" and k in ("mc", "mr"))]

    def f(*xs):
        w = dict(v, **dict(zip(keys, xs)))
        return fn(as_logps(w), settings).losses

    assert torch.autograd.gradcheck(f, tuple(v[k] for k in keys), eps=1e-6, atol=1e-6)


def test_rewards_are_defined_and_detached():
    v = random_logps(4, 3)
    s = LossSettings(beta=0.5)
    for name in OPEN_INSTRUCT:
        out = get_loss(name)[0](as_logps(v), s)
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
        if name == "simpo":  # reference-free implicit reward
            torch.testing.assert_close(out.chosen_rewards, 0.5 * v["pc"].detach())
        else:
            torch.testing.assert_close(out.chosen_rewards, 0.5 * (v["pc"] - v["rc"]).detach())
            torch.testing.assert_close(out.rejected_rewards, 0.5 * (v["pr"] - v["rr"]).detach())


def test_simpo_ignores_the_reference():
    v = random_logps(6, 4)
    w = dict(v, rc=torch.zeros(6, dtype=torch.float64), rr=torch.full((6,), -5.0, dtype=torch.float64))
    s = LossSettings(beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(
        get_loss("simpo")[0](as_logps(v), s).losses, get_loss("simpo")[0](as_logps(w), s).losses
    )


def test_nll_term_is_reported_and_absent_by_default():
    v = random_logps(4, 5)
    assert get_loss("dpo")[0](as_logps(v), LossSettings()).nll is None
    out = get_loss("dpo")[0](as_logps(v), LossSettings(nll_loss_weight=1.0))
    torch.testing.assert_close(out.nll, -v["mc"].detach())


# ---- WPO: per-pair weights for any batch size (open-instruct's version broke on the batch dimension) ----


def _buggy_open_instruct_weights(v, chosen_mask, rejected_mask):
    """open-instruct's wpo weights: per-sequence sums [B] multiplied by a [B, L] token mask."""
    c = (v["pc"] * chosen_mask).sum(-1) / chosen_mask.sum(-1)
    r = (v["pr"] * rejected_mask).sum(-1) / rejected_mask.sum(-1)
    return torch.clamp(torch.exp(c + r), max=1)


def wpo_contract_holds(weights_fn, v, chosen_mask, rejected_mask) -> bool:
    """The WPO weight of each pair is exp(avg chosen token log-prob + avg rejected), whatever the batch size."""
    try:
        w = weights_fn(v, chosen_mask, rejected_mask)
    except RuntimeError:  # shapes that do not broadcast
        return False
    expected = torch.exp(v["pc"] / chosen_mask.sum(-1) + v["pr"] / rejected_mask.sum(-1))
    return w.shape == expected.shape and torch.allclose(w.detach(), expected.detach(), rtol=1e-9)


def _ours(v, chosen_mask, rejected_mask):
    means = dict(v, mc=v["pc"] / chosen_mask.sum(-1), mr=v["pr"] / rejected_mask.sum(-1))
    return wpo_weights(as_logps(means))


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_wpo_weights_per_pair_for_any_batch_size(batch):
    g = torch.Generator().manual_seed(batch)
    length = 11
    chosen_mask = (torch.arange(length) < torch.randint(2, length, (batch, 1), generator=g)).double()
    rejected_mask = (torch.arange(length) < torch.randint(2, length, (batch, 1), generator=g)).double()
    token_logps = {k: -torch.rand(batch, length, generator=g, dtype=torch.float64) for k in ("c", "r")}
    v = random_logps(batch, batch)
    v["pc"] = (token_logps["c"] * chosen_mask).sum(-1)
    v["pr"] = (token_logps["r"] * rejected_mask).sum(-1)
    assert wpo_contract_holds(_ours, v, chosen_mask, rejected_mask)
    # the same check catches open-instruct's broadcasting bug at every one of these batch sizes
    assert not wpo_contract_holds(_buggy_open_instruct_weights, v, chosen_mask, rejected_mask)
    # and a pair's loss does not depend on the other pairs of its batch
    s = LossSettings(beta=0.3)
    full = get_loss("wpo")[0](as_logps(v), s).losses
    for i in range(batch):
        single = {k: t[i : i + 1] for k, t in v.items()}
        torch.testing.assert_close(get_loss("wpo")[0](as_logps(single), s).losses, full[i : i + 1])


def test_wpo_weight_has_no_gradient_path():
    v = random_logps(3, 9)
    out = get_loss("wpo")[0](as_logps(v), LossSettings(beta=0.3))
    grads = torch.autograd.grad(out.losses.sum(), [v["mc"], v["mr"]], allow_unused=True)
    assert all(g is None for g in grads)


def test_robust_rejects_half_label_noise():
    with pytest.raises(ValueError, match="label_smoothing"):
        get_loss("robust")[0](as_logps(random_logps(2, 0)), LossSettings(label_smoothing=0.5))


def test_validation_rejects_meaningless_combinations():
    base = {"model_name_or_path": "m", "mixer_list": ["d.jsonl", "1.0"], "reference_logprobs_cache_path": "x"}
    with pytest.raises(UserError, match="label_smoothing has no meaning for --loss_type ipo"):
        validate(TrainArguments(**base, loss_type="ipo", label_smoothing=0.1))
    with pytest.raises(UserError, match="gamma_beta_ratio has no meaning for --loss_type dpo"):
        validate(TrainArguments(**base, loss_type="dpo", gamma_beta_ratio=0.5))
    validate(
        TrainArguments(
            **base,
            loss_type="simpo",
            gamma_beta_ratio=0.5,
            nll_loss_weight=1.0,
            reference_free=True,
            separate_forward=True,
            use_liger_kernel=True,
        )
    )


def test_reference_need_follows_the_loss():
    assert not TrainArguments(loss_type="simpo", reference_logprobs_cache_path="x").needs_reference
    assert not TrainArguments(loss_type="dpo", reference_free=True, reference_logprobs_cache_path="x").needs_reference
    assert TrainArguments(loss_type="wpo", reference_logprobs_cache_path="x").needs_reference
    for name, spec in LOSSES.items():
        args = TrainArguments(loss_type=name, reference_logprobs_cache_path="x")
        assert args.length_normalized == spec.length_normalized
        assert args.needs_reference == spec.needs_reference


# ---- TRL: the same log-probs through TRL's own loss code ----


def _trl_dpo_loss(
    loss_type: str,
    beta: float,
    label_smoothing: float,
    token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """Mean loss from TRL's ``DPOTrainer._compute_loss`` with a stand-in model returning ``token_logps`` ``[2B, L-1]``.

    TRL (>= 1.0) computes the loss inline in ``_compute_loss``; the trainer object is a namespace holding only the
    attributes that method reads, and the model returns the per-token log-probs TRL's fused head would.
    """
    n = token_logps.shape[0]
    inputs = {
        "input_ids": torch.zeros(n, completion_mask.shape[1], dtype=torch.long),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trl_compute_loss(
        fused_head_model(token_logps),
        inputs,
        model=SimpleNamespace(training=True),
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )


def _token_batch(batch: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    completion = torch.arange(length + 1) >= torch.randint(1, length // 2, (2 * batch, 1), generator=g)
    completion &= torch.arange(length + 1) < torch.randint(length // 2 + 2, length + 2, (2 * batch, 1), generator=g)
    completion = completion.long()
    completion[0, 1:] = 1  # one reply filling the row
    token_logps = (-3 * torch.rand(2 * batch, length, generator=g, dtype=torch.float64)) * completion[:, 1:]
    ref = -60 * torch.rand(2, batch, generator=g, dtype=torch.float64)
    return token_logps.requires_grad_(), completion, ref[0], ref[1]


@pytest.mark.parametrize(
    "trl_name,ours,smoothing",
    [
        ("sigmoid", "dpo", 0.0),
        ("sigmoid_norm", "dpo_norm", 0.0),
        ("ipo", "ipo", 0.0),
        ("hinge", "hinge", 0.0),
        ("robust", "robust", 0.0),
        ("robust", "robust", 0.3),
    ],
)
def test_matches_trl_dpo_trainer(trl_name, ours, smoothing):
    pytest.importorskip("trl")
    token_logps, completion, ref_c_sum, ref_r_sum = _token_batch(batch=4, length=24, seed=len(trl_name))
    beta = 0.3
    trl_loss = _trl_dpo_loss(trl_name, beta, smoothing, token_logps, completion, ref_c_sum, ref_r_sum)
    (trl_grad,) = torch.autograd.grad(trl_loss, token_logps)

    fn, normalized = get_loss(ours)
    counts = completion[:, 1:].sum(-1).double()
    sums = token_logps.sum(-1)
    values, ref_counts = (sums / counts, counts) if normalized else (sums, torch.ones_like(counts))
    half = values.shape[0] // 2
    logps = PreferenceLogps(values[:half], values[half:], ref_c_sum / ref_counts[:half], ref_r_sum / ref_counts[half:])
    our_loss = fn(logps, LossSettings(beta=beta, label_smoothing=smoothing)).losses.mean()
    (our_grad,) = torch.autograd.grad(our_loss, token_logps)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "trl_name,ours,smoothing", [("simpo", "simpo", 0.0), ("simpo", "simpo", 0.2), ("sigmoid", "dpo", 0.25)]
)
def test_matches_trl_cpo_loss(trl_name, ours, smoothing):
    """SimPO lives in TRL's CPO trainer (reference-free); its sigmoid is conservative DPO with a zero reference."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    beta, ratio = 2.0, 0.4
    v = random_logps(6, 11)
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=smoothing,
        loss_type=trl_name,
        simpo_gamma=ratio * beta,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, v["mc"], v["mr"])
    zero = torch.zeros(6, dtype=torch.float64)
    out = get_loss(ours)[0](
        PreferenceLogps(v["mc"], v["mr"], zero, zero),
        LossSettings(beta=beta, label_smoothing=smoothing, gamma_beta_ratio=ratio),
    )
    torch.testing.assert_close(out.losses, trl_losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected)
    for g_ours, g_trl in zip(
        torch.autograd.grad(out.losses.sum(), [v["mc"], v["mr"]]),
        torch.autograd.grad(trl_losses.sum(), [v["mc"], v["mr"]]),
    ):
        torch.testing.assert_close(g_ours, g_trl, rtol=1e-10, atol=1e-12)


# ---- the flags end to end: one short CLI run each ----


@pytest.mark.slow
def test_cli_wpo_with_nll_separate_forward_and_liger_fallback(tiny_model_dir, synthetic_data, tmp_path):
    from tests.conftest import read_metrics, run_cli, small_run_args

    out = tmp_path / "out"
    args = small_run_args(
        tiny_model_dir, synthetic_data[0], out, loss_type="wpo", beta="0.1", max_train_steps="2", nll_loss_weight="0.5"
    )
    result = run_cli(args + ["--separate_forward", "--use_liger_kernel"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --use_liger_kernel: Liger's Triton kernels need a CUDA device" in result.stdout + result.stderr
    rows = read_metrics(out)
    assert rows and all(math.isfinite(r["train_loss"]) and r["nll_loss"] > 0 for r in rows)


@pytest.mark.slow
def test_cli_simpo_skips_the_reference_pass(tiny_model_dir, synthetic_data, tmp_path):
    from tests.conftest import read_metrics, run_cli, small_run_args

    out = tmp_path / "out"
    args = small_run_args(
        tiny_model_dir,
        synthetic_data[0],
        out,
        loss_type="simpo",
        beta="2",
        max_train_steps="2",
        gamma_beta_ratio="0.5",
    )
    result = run_cli(args, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference log-probs" not in result.stdout + result.stderr
    assert not (tmp_path / "cache").exists()
    rows = read_metrics(out)
    assert rows and "rewards/accuracy" in rows[-1] and "nll_loss" not in rows[-1]
