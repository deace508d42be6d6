"""TRL's losses and modifiers: ours against TRL 1.16's own ``DPOTrainer._compute_loss`` (fp32, 1e-5) on the same
per-token log-probs, and against each paper's formula written here element by element (fp64, 1e-9, gradients too)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from open_instruct.objectives.combination import combination_problems, combined_loss, ld_weighted
from open_instruct.objectives.logprobs import chunked_logprobs, reduce_token_logps
from open_instruct.objectives.losses import LOSSES, LossSettings, PreferenceLogps, loss_spec
from open_instruct.objectives.pair_logprobs import shared_and_tail_sums, wpo_token_means
from open_instruct.training.preference import summed_pair_logps
from open_instruct.training.reference_cache import ReferenceLogps
from tests.data_helpers import random_pair_records
from tests.trl_helpers import fused_head_model, trl_compute_loss

# ---- the same per-token log-probs through TRL's loss code and ours ----


def _token_batch(batch: int, length: int, seed: int, dtype=torch.float32):
    """Per-token policy and reference log-probs ``[2B, L-1]`` (zero off the reply), log sum p^2, completion mask."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, length // 2, (2 * batch, 1), generator=g)
    end = torch.randint(length // 2 + 2, length + 2, (2 * batch, 1), generator=g)
    completion = ((torch.arange(length + 1) >= start) & (torch.arange(length + 1) < end)).long()
    completion[0, 1:] = 1  # one reply filling the row
    mask = completion[:, 1:].to(dtype)
    policy = -3 * torch.rand(2 * batch, length, generator=g, dtype=dtype) * mask
    reference = (policy + 0.15 * torch.randn(2 * batch, length, generator=g, dtype=dtype)).clamp(max=0) * mask
    sum_sq = (policy - 1 - torch.rand(2 * batch, length, generator=g, dtype=dtype)).clamp(max=0) * mask
    return policy.requires_grad_(), reference, sum_sq, completion


def _trl_loss(policy, reference, sum_sq, completion, **config) -> torch.Tensor:
    """TRL's ``DPOTrainer._compute_loss`` on stand-in models returning these per-token values (the reference model's
    forward too, so TRL applies LD-DPO to the reference itself). The trainer object holds only what the method reads."""
    loss_types = config.get("loss_type", ["sigmoid"])
    trainer_model = torch.nn.Module()  # what TRL inspects: training mode, checkpointing, not a PEFT model
    trainer_model.is_gradient_checkpointing = False
    inputs = {
        "input_ids": torch.zeros_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
    }
    return trl_compute_loss(
        fused_head_model(policy, log_sum_sq_probs=sum_sq),
        inputs,
        model=trainer_model,
        ref_model=lambda **kwargs: SimpleNamespace(log_probs=reference),
        args=SimpleNamespace(discopop_tau=config.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
        precompute_ref_logps=False,
        ld_alpha=config.get("ld_alpha"),
        f_divergence_type=config.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=config.get("f_alpha_divergence_coef", 0.5),
        loss_types=loss_types,
        loss_weights=config.get("loss_weights") or [1.0] * len(loss_types),
        beta=config.get("beta", 0.3),
        label_smoothing=config.get("label_smoothing", 0.0),
        use_weighting=config.get("use_weighting", False),
    )


def _reference_table(reference: torch.Tensor, mask: torch.Tensor) -> ReferenceLogps:
    """What the reference cache stores for these pairs (as ``reference_cache.compute`` builds it)."""
    lp = reduce_token_logps(reference[mask], mask)
    shared, _ = shared_and_tail_sums(lp)
    half = lp.sums.shape[0] // 2
    c = lp.counts.to(lp.sums.dtype)
    return ReferenceLogps(lp.sums[:half], c[:half], lp.sums[half:], c[half:], shared[:half], shared[half:])


def _our_loss(policy, reference, sum_sq, completion, names, weights=None, **settings) -> torch.Tensor:
    mask = completion[:, 1:].bool()
    lp = reduce_token_logps(policy[mask], mask)
    lp.token_log_sum_sq = sum_sq[mask]
    s = LossSettings(**{"beta": 0.3, **settings})
    index = torch.arange(policy.shape[0] // 2)
    logps = summed_pair_logps(lp, index, _reference_table(reference, mask), s)
    return combined_loss(names, weights)(logps, s).losses.mean()


CASES = [
    *[({"loss_type": [name]}, [name]) for name in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard")],
    *[({"loss_type": [name]}, [name]) for name in ("aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft")],
    ({"loss_type": ["sigmoid_norm"]}, ["sigmoid_norm"]),
    ({"loss_type": ["sigmoid"]}, ["dpo"]),  # ours = TRL's at smoothing 0
    ({"loss_type": ["sigmoid_norm"]}, ["dpo_norm"]),
    ({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}, ["exo_pair"]),
    ({"loss_type": ["robust"], "label_smoothing": 0.2}, ["robust"]),
    ({"loss_type": ["aot"], "label_smoothing": 0.1}, ["aot"]),
    ({"loss_type": ["aot_unpaired"], "label_smoothing": 0.25}, ["aot_unpaired"]),
    ({"loss_type": ["discopop"], "discopop_tau": 0.3}, ["discopop"]),
    *[
        ({"loss_type": [name], "f_divergence_type": kind, "label_smoothing": eps}, [name])
        for name, eps in [("sigmoid", 0), ("sigmoid_norm", 0), ("hinge", 0), ("ipo", 0), ("exo_pair", 1e-2)]
        + [("robust", 0.1), ("discopop", 0)]
        for kind in ("forward_kl", "js_divergence", "alpha_divergence")
    ],
    ({"loss_type": ["ipo"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, ["ipo"]),
    ({"loss_type": ["hinge"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.7}, ["hinge"]),
    ({"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}, ["sigmoid"]),
    *[
        ({"loss_type": [name], "ld_alpha": alpha}, [name])
        for name in ("sigmoid", "sigmoid_norm", "ipo", "bco_pair", "aot", "apo_down")
        for alpha in (0.0, 0.5)
    ],
    # sft with use_weighting: TRL 1.16 fails (an in-place product on its expanded batch value); ours is tested below
    *[({"loss_type": [name], "use_weighting": True}, [name]) for name in ("sigmoid", "ipo", "nca_pair", "apo_zero")],
    ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, ["sigmoid", "bco_pair", "sft"]),
    (
        {
            "loss_type": ["sigmoid", "ipo", "bco_pair"],
            "loss_weights": [1.0, 0.5, 0.1],
            "ld_alpha": 0.3,
            "use_weighting": True,
        },
        ["sigmoid", "ipo", "bco_pair"],
    ),
    (
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "ld_alpha": 0.5},
        ["sigmoid", "bco_pair", "sft"],
    ),
    (
        {"loss_type": ["robust", "aot_unpaired"], "loss_weights": [0.6, 0.4], "label_smoothing": 0.2},
        ["robust", "aot_unpaired"],
    ),
    (
        {"loss_type": ["sigmoid_norm", "hinge", "discopop"], "f_divergence_type": "js_divergence"},
        ["sigmoid_norm", "hinge", "discopop"],
    ),
]


@pytest.mark.parametrize("config,ours", CASES, ids=lambda x: str(x) if isinstance(x, list) else None)
def test_matches_trl_compute_loss(config, ours):
    pytest.importorskip("trl")
    policy, reference, sum_sq, completion = _token_batch(batch=5, length=20, seed=len(str(config)))
    trl = _trl_loss(policy, reference, sum_sq, completion, **config)
    (trl_grad,) = torch.autograd.grad(trl, policy)
    settings = {k: v for k, v in config.items() if k not in ("loss_type", "loss_weights")}
    assert not combination_problems(ours, config.get("loss_weights"), LossSettings(**settings))
    our = _our_loss(policy, reference, sum_sq, completion, ours, config.get("loss_weights"), **settings)
    (our_grad,) = torch.autograd.grad(our, policy)
    assert our.dtype == torch.float32
    torch.testing.assert_close(our, trl, rtol=1e-5, atol=1e-5)
    # off the replies TRL's stand-in values are constant zeros summed in (a real fused head gives them no gradient)
    mask = completion[:, 1:].to(our_grad.dtype)
    torch.testing.assert_close(our_grad * mask, trl_grad * mask, rtol=1e-5, atol=1e-5)


# ---- each function against its paper's formula, written here pair by pair (fp64) ----


def _nls(h):  # -log sigma(h)
    return torch.log1p(torch.exp(-h)) if h >= 0 else -h + torch.log1p(torch.exp(h))


def _sig(h):
    return 1 / (1 + torch.exp(-h))


def _f_prime(log_t, kind, alpha):
    t = torch.exp(log_t)
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return torch.log(2 * t / (1 + t))
    if kind == "alpha_divergence":
        return (t ** (alpha - 1) - 1) / (alpha - 1)
    return log_t


def _pairs(batch: int, seed: int):
    """Per-pair leaves (fp64): policy/reference chosen/rejected values, token counts."""
    g = torch.Generator().manual_seed(seed)
    v = {k: (-20 * torch.rand(batch, generator=g, dtype=torch.float64)) for k in ("rc", "rr")}
    v["pc"] = (v["rc"] + torch.randn(batch, generator=g, dtype=torch.float64)).requires_grad_()
    v["pr"] = (v["rr"] + torch.randn(batch, generator=g, dtype=torch.float64)).requires_grad_()
    v["nc"] = torch.randint(1, 30, (batch,), generator=g)
    v["nr"] = torch.randint(1, 30, (batch,), generator=g)
    return v


def paper(name: str, v: dict, s: LossSettings, averaged: bool) -> torch.Tensor:
    """Per-pair losses ``[B]`` from the papers' formulas (TRL's choices where noted in our docstrings)."""
    b, eps, n = s.beta, s.label_smoothing, v["pc"].shape[0]
    c_all, r_all = v["pc"] - v["rc"], v["pr"] - v["rr"]

    def d(i):  # f-DPO margin; on averages the divergence sees the summed log-ratio (TRL)
        kind, a = s.f_divergence_type, s.f_alpha_divergence_coef
        if not averaged:
            return _f_prime(c_all[i], kind, a) - _f_prime(r_all[i], kind, a)
        nc, nr = float(v["nc"][i]), float(v["nr"][i])
        return _f_prime(c_all[i] * nc, kind, a) / nc - _f_prime(r_all[i] * nr, kind, a) / nr

    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            u = sorted([v["pc"][i] - v["pr"][i] for i in range(n)], key=float)
            w = sorted([v["rc"][i] - v["rr"][i] for i in range(n)], key=float)
        else:
            u, w = sorted(list(c_all), key=float), sorted(list(r_all), key=float)
        return torch.stack([(1 - eps) * _nls(b * (x - y)) + eps * _nls(-b * (x - y)) for x, y in zip(u, w)])
    out = []
    for i in range(n):
        c, r = c_all[i], r_all[i]
        if name in ("sigmoid", "sigmoid_norm"):
            value = _nls(b * d(i))
        elif name in ("dpo", "dpo_norm"):
            value = (1 - eps) * _nls(b * d(i)) + eps * _nls(-b * d(i))
        elif name == "robust":
            value = ((1 - eps) * _nls(b * d(i)) - eps * _nls(-b * d(i))) / (1 - 2 * eps)
        elif name == "ipo":
            value = (d(i) - 1 / (2 * b)) ** 2
        elif name == "hinge":
            value = torch.clamp(1 - b * d(i), min=0)
        elif name == "exo_pair":  # KL(q || p) with q = (sigma(h), sigma(-h)), p = (1 - eps, eps)
            q = _sig(b * d(i))
            value = q * torch.log(q / (1 - eps)) + (1 - q) * torch.log((1 - q) / eps)
        elif name == "discopop":
            h = b * d(i)
            w = _sig(h / s.discopop_tau)
            value = (1 - w) * _nls(h) + w * torch.exp(-h)
        elif name == "nca_pair":
            value = _nls(b * c) + 0.5 * _nls(-b * c) + 0.5 * _nls(-b * r)
        elif name == "bco_pair":
            value = _nls(b * c) + _nls(-b * r)
        elif name == "sppo_hard":
            value = (c - 1 / (2 * b)) ** 2 + (r + 1 / (2 * b)) ** 2
        elif name == "apo_zero":
            value = (1 - _sig(b * c)) + _sig(b * r)
        elif name == "apo_down":
            value = _sig(b * c) + (1 - _sig(b * (c - r)))
        else:
            raise AssertionError(name)
        out.append(value)
    return torch.stack(out)


def _ours_per_pair(name: str, v: dict, s: LossSettings) -> torch.Tensor:
    spec = loss_spec(name)
    logps = PreferenceLogps(v["pc"], v["pr"], v["rc"], v["rr"], chosen_counts=v["nc"], rejected_counts=v["nr"])
    logps.averaged = spec.length_normalized
    return spec.fn(logps, s).losses


PAPER_SETTINGS = [
    LossSettings(beta=0.1),
    LossSettings(beta=0.7, label_smoothing=0.2, discopop_tau=0.3),
    LossSettings(beta=0.5, label_smoothing=0.01, f_divergence_type="forward_kl"),
    LossSettings(beta=0.5, label_smoothing=0.1, f_divergence_type="js_divergence"),
    LossSettings(beta=0.4, label_smoothing=0.3, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
]
PAPER_LOSSES = [n for n in LOSSES if n not in ("sft", "simpo", "wpo")]  # sft, simpo, wpo: own tests


@pytest.mark.parametrize("name", PAPER_LOSSES)
@pytest.mark.parametrize("settings", PAPER_SETTINGS, ids=lambda s: f"{s.f_divergence_type}-{s.label_smoothing}")
def test_matches_paper_formula_fp64(name, settings):
    spec = LOSSES[name]
    if settings.f_divergence_type != "reverse_kl" and "f_divergence_type" not in spec.hyperparameters:
        pytest.skip("TRL applies f-divergences only to the margin losses")
    if "label_smoothing" not in spec.hyperparameters:
        settings = LossSettings(**{**settings.__dict__, "label_smoothing": 0.0})
    if name == "exo_pair" and settings.label_smoothing == 0:
        settings = LossSettings(**{**settings.__dict__, "label_smoothing": 1e-3})
    for batch, seed in ((1, 0), (6, 1)):
        v = _pairs(batch, seed)
        ours = _ours_per_pair(name, v, settings)
        theirs = paper(name, v, settings, spec.length_normalized)
        assert ours.dtype == torch.float64 and ours.shape == (batch,)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
        for leaf in ("pc", "pr"):
            (g_ours,) = torch.autograd.grad(ours.sum(), v[leaf], retain_graph=True)
            (g_theirs,) = torch.autograd.grad(theirs.sum(), v[leaf], retain_graph=True)
            torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-9)


def _replies(batch: int, seed: int):
    """Per-token fp64 log-probs of 2B replies (lists of leaves) and their log sum p^2."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (2 * batch,), generator=g).tolist()
    tokens = [(-3 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_() for n in lengths]
    sum_sq = [t.detach() - 1 - torch.rand(t.shape[0], generator=g, dtype=torch.float64) for t in tokens]
    return tokens, sum_sq


def _as_sequence_logprobs(tokens, sum_sq):
    width = max(t.shape[0] for t in tokens)
    mask = torch.stack([torch.arange(width) < t.shape[0] for t in tokens])
    lp = reduce_token_logps(torch.cat(tokens), mask)
    lp.token_log_sum_sq = torch.cat(sum_sq)
    return lp


def test_ld_dpo_split_matches_the_paper():
    """LD-DPO (arXiv:2409.06411): shared part up to the shorter reply's length at full weight, the rest times alpha."""
    tokens, sum_sq = _replies(4, 3)
    lp = _as_sequence_logprobs(tokens, sum_sq)
    for alpha in (0.0, 0.35, 1.0):
        ours = ld_weighted(*shared_and_tail_sums(lp), alpha)
        theirs = []
        for i, t in enumerate(tokens):
            k = min(tokens[i % 4].shape[0], tokens[i % 4 + 4].shape[0])
            theirs.append(t[:k].sum() + alpha * t[k:].sum())
        theirs = torch.stack(theirs)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
        g_ours = torch.autograd.grad(ours.sum(), tokens, retain_graph=True)
        g_theirs = torch.autograd.grad(theirs.sum(), tokens, retain_graph=True)
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_wpo_weights_sft_and_combination_match_the_papers():
    """WPO eq. 2 aligned weights, MPO's token-mean SFT term, and sum_k w_k loss_k, against direct formulas."""
    tokens, sum_sq = _replies(3, 4)
    lp = _as_sequence_logprobs(tokens, sum_sq)
    reference = torch.tensor([-9.0, -4.0, -13.0, -7.5, -2.0, -10.0], dtype=torch.float64)
    s = LossSettings(beta=0.4, use_weighting=True)
    logps = PreferenceLogps(
        lp.sums[:3],
        lp.sums[3:],
        reference[:3],
        reference[3:],
        lp.means[:3],
        lp.means[3:],
        lp.counts[:3],
        lp.counts[3:],
    )
    wpo = wpo_token_means(lp)
    logps.wpo_chosen, logps.wpo_rejected = wpo[:3], wpo[3:]
    ours = combined_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])(logps, s)
    sft = -torch.cat(tokens[:3]).mean()
    theirs = []
    for i in range(3):
        c, r = tokens[i].sum() - reference[i], tokens[i + 3].sum() - reference[i + 3]
        weight = math.exp(
            float((tokens[i].detach() - sum_sq[i]).mean() + (tokens[i + 3].detach() - sum_sq[i + 3]).mean())
        )
        per_pair = 0.8 * _nls(0.4 * (c - r)) + 0.2 * (_nls(0.4 * c) + _nls(-0.4 * r)) + 1.0 * sft
        theirs.append(weight * per_pair)
    theirs = torch.stack(theirs)
    torch.testing.assert_close(ours.losses, theirs, rtol=1e-9, atol=1e-9)
    assert set(ours.components) == {"sigmoid", "bco_pair", "sft"}
    g_ours = torch.autograd.grad(ours.losses.sum(), tokens, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs.sum(), tokens)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_chunked_path_log_sum_sq_matches_full_softmax(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    lp = chunked_logprobs(model, ids, torch.ones_like(ids), labels, chunk_size=7, with_sum_sq=True)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits.double()[:, :-1], -1)
    expected = torch.log((probs**2).sum(-1))[labels[:, 1:] != -100]
    torch.testing.assert_close(lp.token_log_sum_sq.double(), expected, rtol=1e-5, atol=1e-5)
    assert not lp.token_log_sum_sq.requires_grad and lp.token_logps.requires_grad


# ---- what is rejected before any work ----


@pytest.mark.parametrize(
    "names,weights,settings,message",
    [
        (["sigmoid", "bco_pair"], [1.0], {}, "--loss_weights has 1 values for 2 --loss_type entries"),
        (["sigmoid"], None, {"label_smoothing": 0.1}, "--label_smoothing has no meaning for --loss_type sigmoid"),
        (["sigmoid", "bco_pair"], None, {"f_divergence_type": "js_divergence"}, "--f_divergence_type has no meaning"),
        (["aot", "sigmoid"], None, {"use_weighting": True}, "--use_weighting has no meaning for --loss_type aot"),
        (["bco_pair"], None, {"reference_free": True}, "--reference_free: bco_pair needs the reference"),
        (["hinge"], None, {"discopop_tau": 0.2}, "--discopop_tau has no meaning"),
        (["sft"], None, {"ld_alpha": 0.5}, "--ld_alpha has no meaning for --loss_type sft"),
        (["sigmoid"], None, {"ld_alpha": 1.5}, "--ld_alpha must be in [0, 1]"),
        (["exo_pair"], None, {}, "exo_pair needs --label_smoothing > 0"),
        (["sigmoid"], None, {"f_alpha_divergence_coef": 0.2}, "--f_alpha_divergence_coef needs"),
        (["sigmoid", "sigmoid"], None, {}, "lists a loss twice"),
        (["kto"], None, {}, "'kto' is not available"),
    ],
)
def test_invalid_combinations_are_named(names, weights, settings, message):
    reference_free = settings.pop("reference_free", False)
    problems = combination_problems(names, weights, LossSettings(**settings), reference_free)
    assert any(message in p for p in problems), problems


def test_valid_trl_recipes_pass():
    assert not combination_problems(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], LossSettings())
    assert not combination_problems(["sigmoid", "sft"], None, LossSettings(f_divergence_type="js_divergence"))
    assert not combination_problems(["robust", "sigmoid"], None, LossSettings(label_smoothing=0.1))
    assert not combination_problems(["dpo", "simpo"], None, LossSettings(), reference_free=True)


def test_ld_split_and_wpo_terms_same_packed_and_padded(tiny_model_dir):
    """LD-DPO's split sums and the WPO terms do not depend on the batch layout (padded rows or one packed row)."""
    from transformers import AutoModelForCausalLM

    from open_instruct.data.collate import PackedPairCollator, PaddedPairCollator
    from open_instruct.model.packing import packed_sequence_logprobs, prepare_model_for_packing
    from open_instruct.objectives.logprobs import sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    records = random_pair_records(4, 5, model.config.vocab_size, (2, 5), (1, 15))
    padded = PaddedPairCollator(pad_token_id=0)(records)
    expected = sequence_logprobs(
        model, padded["input_ids"], padded["attention_mask"], padded["labels"], chunk_size=5, with_sum_sq=True
    )
    prepare_model_for_packing(model)
    packed = packed_sequence_logprobs(model, PackedPairCollator()(records), chunk_size=5, with_sum_sq=True)
    for ours, theirs in zip(shared_and_tail_sums(packed), shared_and_tail_sums(expected)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wpo_token_means(packed), wpo_token_means(expected), rtol=1e-5, atol=1e-5)
    shared, tail = shared_and_tail_sums(expected)
    assert (tail[:4] == 0).logical_or(tail[4:] == 0).all()  # the shorter reply of each pair has no tail


# ---- model level: TRL's own fused log-probs and loss on the tiny model vs our chunked path and cached reference ----


def _tiny_pair(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from open_instruct.data.collate import PaddedPairCollator

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy some way from its reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    records = random_pair_records(4, 7, policy.config.vocab_size, (2, 5), (2, 14))
    return policy, reference, PaddedPairCollator(pad_token_id=0)(records)


MODEL_CASES = [
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "ld_alpha": 0.5},
    # (hinge with use_weighting: TRL 1.16's in-place weight product on relu's output breaks its own backward)
    {"loss_type": ["ipo", "sigmoid_norm"], "use_weighting": True, "f_divergence_type": "js_divergence"},
    {"loss_type": ["aot_unpaired", "apo_zero"], "label_smoothing": 0.1, "ld_alpha": 0.2},
]


@pytest.mark.parametrize("config", MODEL_CASES, ids=lambda c: "+".join(c["loss_type"]))
def test_model_level_matches_trl_dpo_trainer(tiny_model_dir, config):
    """TRL's ``_compute_loss`` with its fused LM head on the tiny policy and reference models, against our chunked
    log-probs, our reference pass (as cached) and our objective: loss and every parameter gradient, fp32."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    from open_instruct.training import reference_cache

    policy, reference, batch = _tiny_pair(tiny_model_dir)
    settings = LossSettings(beta=0.3, **{k: v for k, v in config.items() if k not in ("loss_type", "loss_weights")})

    def logprob_fn(model, b):
        return chunked_logprobs(
            model, b["input_ids"], b["attention_mask"], b["labels"], chunk_size=6, with_sum_sq=settings.use_weighting
        )

    cached = reference_cache.compute(
        reference,
        [batch],
        SimpleNamespace(gather=lambda x: x, is_local_main_process=False, num_processes=1),
        logprob_fn,
        4,
    )
    lp = logprob_fn(policy, batch)
    logps = summed_pair_logps(lp, batch["index"], cached, settings)
    ours = combined_loss(config["loss_type"], config.get("loss_weights"))(logps, settings).losses.mean()
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    add_fused_lm_head(policy, outputs=outputs)
    add_fused_lm_head(reference)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    trl = trl_compute_loss(
        policy,
        inputs,
        model=policy,
        ref_model=reference,
        args=SimpleNamespace(discopop_tau=settings.discopop_tau, gradient_checkpointing_kwargs=None),
        precompute_ref_logps=False,
        ld_alpha=settings.ld_alpha,
        f_divergence_type=settings.f_divergence_type,
        f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
        loss_types=config["loss_type"],
        loss_weights=config.get("loss_weights") or [1.0] * len(config["loss_type"]),
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        use_weighting=settings.use_weighting,
    )
    trl.backward()
    torch.testing.assert_close(ours.detach(), trl.detach(), rtol=1e-5, atol=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---- flags and YAML keys ----


def test_trl_flags_and_yaml_keys(tmp_path):
    from open_instruct.config import validate
    from open_instruct.config.cli import parse_args

    recipe = tmp_path / "mpo.yaml"
    recipe.write_text(
        "model_name_or_path: m\nmixer_list: [d.jsonl, '1.0']\nloss_type: [sigmoid, bco_pair, sft]\n"
        "loss_weights: [0.8, 0.2, 1.0]\nld_alpha: 0.5\nuse_weighting: true\n"
    )
    args = parse_args([str(recipe), "--f_divergence_type", "js_divergence", "--loss_type", "sigmoid", "ipo", "sft"])
    validate(args)
    assert args.loss_type == ["sigmoid", "ipo", "sft"] and args.loss_weights == [0.8, 0.2, 1.0]
    s = args.loss_settings()
    assert (s.ld_alpha, s.use_weighting, s.f_divergence_type) == (0.5, True, "js_divergence")
    assert args.needs_reference and not args.length_normalized


def test_invalid_combination_is_an_error_line_before_any_work(tmp_path, capsys):
    from open_instruct.dpo_tune_cache import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--model_name_or_path", str(tmp_path / "absent"), "--mixer_list", str(tmp_path / "absent.jsonl"), "1.0"]
            + ["--loss_type", "sigmoid", "bco_pair", "--loss_weights", "1.0"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--loss_weights has 1 values for 2 --loss_type entries" in err
    assert len(err.strip().splitlines()) == 1
