"""Losses: hand-computed ITC / ITM / ITG / LM values, gathered negatives, hard-negative sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qvlm import losses as L
from qvlm.losses import (
    ITC_TEMP_INIT,
    clamp_temperature,
    combine,
    itc_loss,
    itg_loss,
    itg_loss_from_hidden,
    itm_labels,
    itm_logits_from_queries,
    itm_loss,
    lm_loss,
    sample_hard_negatives,
)


def ce(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], by hand."""
    return -(logits[target] - math.log(sum(math.exp(x) for x in logits)))


def aligned(b: int = 4, q: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """image i has queries e_{qi}, ..., e_{qi+q-1}; text i equals its middle query; all else orthogonal."""
    eye = torch.eye(b * q)
    images = eye.view(b, q, b * q)  # (B, Q, E)
    texts = images[:, q // 2]  # (B, E)
    return images, texts


# --------------------------------------------------------------------------------------------- ITC


def test_itc_aligned_features_give_near_zero_loss_and_full_accuracy():
    images, texts = aligned()
    out = itc_loss(images, texts, temperature=0.01)
    assert out.loss.item() < 1e-6
    assert out.i2t_acc.item() == 1.0 and out.t2i_acc.item() == 1.0


def test_itc_shuffled_pairing_gives_high_loss():
    images, texts = aligned()
    out = itc_loss(images, texts.roll(1, dims=0), temperature=0.01)
    assert out.loss.item() > 50  # every positive is 1/0.01 below the best negative
    assert out.i2t_acc.item() == 0.0 and out.t2i_acc.item() == 0.0


def test_itc_hand_computed_2x2():
    # sims (max over 2 queries): i0-t0 = 1, i0-t1 = 0, i1-t0 = 0.6, i1-t1 = 0.8; temperature 0.5
    images = torch.tensor([[[1.0, 0.0], [0.0, -1.0]], [[0.6, 0.8], [-1.0, 0.0]]]) * 3  # normalised inside
    texts = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    out = itc_loss(images, texts, temperature=torch.tensor(0.5))
    i2t = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2
    t2i = (ce([2.0, 1.2], 0) + ce([0.0, 1.6], 1)) / 2
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    torch.testing.assert_close(out.sim_i2t, torch.tensor([[2.0, 0.0], [1.2, 1.6]]))
    torch.testing.assert_close(out.sim_t2i, torch.tensor([[2.0, 1.2], [0.0, 1.6]]))
    assert out.i2t_acc.item() == 1.0 and out.t2i_acc.item() == 1.0


def test_itc_label_smoothing_hand_computed():
    images = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (B=2, Q=1, E=2)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    eps, logits = 0.2, [1 / 0.1, 0.0]  # each row: positive 1/temp, negative 0
    uniform = (ce(logits, 0) + ce(logits, 1)) / 2
    expected = (1 - eps) * ce(logits, 0) + eps * uniform
    out = itc_loss(images, texts, temperature=0.1, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)


def test_itc_uses_max_over_queries():
    b, q = 3, 4
    images, texts = aligned(b, q)  # only query q // 2 of each image matches its text
    out = itc_loss(images, texts, temperature=0.1)
    torch.testing.assert_close(out.sim_i2t, torch.eye(b) / 0.1)  # a mean over queries would give 1/(4*0.1)
    torch.testing.assert_close(out.sim_t2i, torch.eye(b) / 0.1)


def test_itc_gathered_rank1_matches_single_process_rows():
    g = torch.Generator().manual_seed(0)
    b, w, q, e = 3, 2, 4, 8
    all_images, all_texts = torch.randn(b * w, q, e, generator=g), torch.randn(b * w, e, generator=g)
    rank = 1
    local = slice(rank * b, (rank + 1) * b)
    out = itc_loss(all_images[local], all_texts[local], 0.07,
                   all_image_feats=all_images, all_text_feat=all_texts, rank=rank)
    assert out.targets.tolist() == [3, 4, 5]
    assert out.sim_i2t.shape == (b, b * w) and out.sim_t2i.shape == (b, b * w)

    full = itc_loss(all_images, all_texts, 0.07)  # one process holding the whole batch
    torch.testing.assert_close(out.sim_i2t, full.sim_i2t[local])
    torch.testing.assert_close(out.sim_t2i, full.sim_t2i[local])
    targets = torch.arange(b * w)[local]
    expected = (torch.nn.functional.cross_entropy(full.sim_i2t[local], targets)
                + torch.nn.functional.cross_entropy(full.sim_t2i[local], targets)) / 2
    torch.testing.assert_close(out.loss, expected)
    wrong_rank = itc_loss(all_images[local], all_texts[local], 0.07,
                          all_image_feats=all_images, all_text_feat=all_texts, rank=0)
    assert not torch.allclose(wrong_rank.loss, out.loss)


def test_itc_gradient_flows_to_local_features_and_temperature():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 8, generator=g).requires_grad_()
    texts = torch.randn(2, 8, generator=g).requires_grad_()
    temp = torch.nn.Parameter(torch.tensor(ITC_TEMP_INIT))
    others_img, others_txt = torch.randn(2, 3, 8, generator=g), torch.randn(2, 8, generator=g)
    out = itc_loss(images, texts, temp, all_image_feats=torch.cat([others_img, images]),
                   all_text_feat=torch.cat([others_txt, texts]), rank=1)
    out.loss.backward()
    for grad in (images.grad, texts.grad, temp.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not out.sim_i2t.requires_grad and not out.sim_t2i.requires_grad


def test_itc_rejects_half_gathered_or_bad_rank():
    images, texts = aligned(2, 2)
    with pytest.raises(ValueError, match="both"):
        itc_loss(images, texts, 0.07, all_image_feats=images)
    with pytest.raises(ValueError, match="rank"):
        itc_loss(images, texts, 0.07, all_image_feats=images, all_text_feat=texts, rank=1)


def test_temperature_clamped_in_place_and_inside_loss():
    for value, expected in [(1e-6, 0.001), (2.0, 0.5), (ITC_TEMP_INIT, ITC_TEMP_INIT), (-1.0, 0.001)]:
        temp = torch.nn.Parameter(torch.tensor(value))
        assert clamp_temperature(temp) is temp
        assert temp.item() == pytest.approx(expected) and 0.001 <= temp.item() <= 0.5
        assert temp.requires_grad and temp.grad_fn is None
    images, texts = aligned(2, 2)
    tiny, floor = itc_loss(images, texts, 1e-6), itc_loss(images, texts, 0.001)
    torch.testing.assert_close(tiny.sim_i2t, floor.sim_i2t)
    huge, ceiling = itc_loss(images, texts, 10.0), itc_loss(images, texts, 0.5)
    torch.testing.assert_close(huge.loss, ceiling.loss)


# ---------------------------------------------------------------------------------- hard negatives


def assert_never_positive(sim_i2t, sim_t2i, targets, draws: int = 200, seed: int = 0) -> set[tuple]:
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for _ in range(draws):
        neg = sample_hard_negatives(sim_i2t, sim_t2i, targets, generator=g)
        assert (neg.text_idx != targets).all() and (neg.image_idx != targets).all()
        seen.update((row, col) for row, col in enumerate(neg.text_idx.tolist()))
    return seen


def test_hard_negative_is_never_the_positive_random_sims():
    g = torch.Generator().manual_seed(0)
    for b, w in [(5, 1), (3, 2)]:
        sims = torch.randn(2, b, b * w, generator=g) * 5
        targets = torch.arange(b) + (w - 1) * b  # last rank
        assert_never_positive(sims[0], sims[1], targets)


def test_hard_negative_never_positive_with_inf_and_nan():
    nan, inf = math.nan, math.inf
    sims = torch.tensor([
        [inf, 0.0, 1.0, nan],  # +inf on the positive
        [nan, nan, nan, nan],  # nothing usable: uniform over the negatives
        [-inf, -inf, -inf, -inf],  # all weights zero: uniform over the negatives
        [0.0, 2.0, -inf, 100.0],  # large but finite
    ])
    targets = torch.arange(4)
    seen = assert_never_positive(sims, sims.flip(1), targets, draws=300)
    assert {col for row, col in seen if row == 1} == {0, 2, 3}
    assert {col for row, col in seen if row == 2} == {0, 1, 3}
    assert {col for row, col in seen if row == 0} <= {1, 2}  # NaN column never drawn


def test_hard_negative_plus_inf_on_a_negative_takes_all_the_mass():
    # row 1: the positive is +inf too, but is excluded
    sims = torch.tensor([[0.0, math.inf, 5.0], [0.0, math.inf, math.inf], [1.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg = sample_hard_negatives(sims, sims, torch.arange(3), generator=g)
        assert neg.text_idx[0] == 1 and neg.text_idx[1] == 2


def test_hard_negative_batch_of_two_picks_the_other_and_batch_of_one_raises():
    sims = torch.tensor([[3.0, -2.0], [math.nan, 1.0]])
    neg = sample_hard_negatives(sims, sims.T.contiguous(), torch.arange(2))
    assert neg.text_idx.tolist() == [1, 0] and neg.image_idx.tolist() == [1, 0]
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))


def test_hard_negative_frequency_follows_softmax():
    # row 0: positive column 0, negatives weighted 1 : 3 (sims are log-weights)
    sims = torch.tensor([[10.0, 0.0, math.log(3.0)], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sims, sims, torch.arange(3), generator=g).text_idx[0]
                         for _ in range(2000)])
    assert draws.ne(0).all()
    assert (draws == 2).float().mean().item() == pytest.approx(0.75, abs=0.03)


def test_hard_negative_sampling_is_deterministic_with_a_generator():
    sims = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    a = sample_hard_negatives(sims, sims.T, torch.arange(6), generator=torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sims, sims.T, torch.arange(6), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.text_idx, b.text_idx) and torch.equal(a.image_idx, b.image_idx)


def test_hard_negatives_draw_where_the_generator_lives_and_ignore_the_sims_dtype():
    """Training on a GPU keeps the sampling generator on the CPU (checkpointable, the same draws on
    every device): the weights go to the generator, the indices come back on the sims' device.
    bf16 sims (autocast) draw exactly what their fp32 values draw."""
    sims = torch.randn(8, 8, generator=torch.Generator().manual_seed(3)).bfloat16()
    a = sample_hard_negatives(sims, sims.T, torch.arange(8), generator=torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sims.float(), sims.T.float(), torch.arange(8), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.text_idx, b.text_idx) and torch.equal(a.image_idx, b.image_idx)
    assert a.text_idx.device == sims.device and a.text_idx.dtype == torch.long


# --------------------------------------------------------------------------------------------- ITM


def test_itm_labels_layout():
    assert itm_labels(3).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert itm_labels(1).dtype == torch.long


def test_itm_loss_hand_computed():
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [ln3, 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 1])
    out = itm_loss(logits, labels)
    expected = (-math.log(0.75) - math.log(0.75) + math.log(2.0)) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.acc.item() == pytest.approx(2 / 3)  # the tie argmaxes to 0


def test_itm_logits_are_the_mean_over_queries():
    head = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[0.0, 4.0], [0.0, 0.0]]])  # (N=2, Q=2, 2)
    assert itm_logits_from_queries(head).tolist() == [[2.0, 1.0], [0.0, 2.0]]


# ------------------------------------------------------------------------------------- ITG and LM

IDS = torch.tensor([[0, 2, 1, 2], [0, 1, 2, 2]])  # 0 = decoder-start token
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 1 is padded after 2 tokens


def itg_logits() -> torch.Tensor:
    return torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3).sin() * 2  # (B=2, T=4, V=3)


def test_itg_hand_computed_and_token_count():
    logits = itg_logits()
    rows = logits.tolist()
    # supervised: row 0 positions 0..2 predict ids 2, 1, 2; row 1 position 0 predicts id 1
    terms = [ce(rows[0][0], 2), ce(rows[0][1], 1), ce(rows[0][2], 2), ce(rows[1][0], 1)]
    out = itg_loss(logits, IDS, MASK)
    assert out.tokens.item() == 4
    assert out.loss.item() == pytest.approx(sum(terms) / 4, abs=1e-6)


def test_itg_ignores_padding_last_position_and_first_token():
    base = itg_loss(itg_logits(), IDS, MASK).loss
    padded = itg_logits()
    padded[1, 1:] = 100.0  # row 1: positions 1.. predict padding
    padded[:, -1] = -50.0  # the last position has no next token: cannot be compared with anything
    assert torch.equal(itg_loss(padded, IDS, MASK).loss, base)
    ids = IDS.clone()
    ids[:, 0] = 1  # the decoder-start token is never a target
    ids[1, 2:] = 0  # nor are padded ids
    assert torch.equal(itg_loss(itg_logits(), ids, MASK).loss, base)
    changed = itg_logits()
    changed[1, 0] += torch.tensor([0.0, 5.0, 0.0])  # a supervised position does matter
    assert not torch.allclose(itg_loss(changed, IDS, MASK).loss, base)


def test_itg_from_hidden_runs_the_head_on_caption_tokens_only_and_equals_itg_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 5)  # (B, T, D)
    head = torch.nn.Linear(5, 3)
    seen: list[int] = []

    def counting_head(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[0])
        return head(h)

    out = itg_loss_from_hidden(hidden, counting_head, IDS, MASK)
    full = itg_loss(head(hidden), IDS, MASK)
    assert seen == [4]  # 3 positions of row 0 + 1 of row 1: no padding, no last position
    assert out.tokens.item() == full.tokens.item() == 4
    assert out.loss.item() == pytest.approx(full.loss.item(), abs=1e-6)
    with pytest.raises(ValueError, match="no supervised tokens"):
        itg_loss_from_hidden(hidden, head, IDS, torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]]))
    # the collator's positions (found on the CPU): the same loss and count, and the same error
    positions = L.itg_positions(MASK)
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 0]]
    given = itg_loss_from_hidden(hidden, head, IDS, MASK, positions)
    assert given.tokens.item() == 4 and given.loss.item() == pytest.approx(full.loss.item(), abs=1e-6)
    with pytest.raises(ValueError, match="no supervised tokens"):
        itg_loss_from_hidden(hidden, head, IDS, MASK, positions[:, :0])


def test_lm_loss_ignores_minus_100_and_matches_hand_value():
    logits = itg_logits()
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 0, -100, -100]])
    rows = logits.tolist()
    expected = (ce(rows[0][1], 1) + ce(rows[0][2], 2) + ce(rows[1][0], 0)) / 3
    out = lm_loss(logits, labels)
    assert out.tokens.item() == 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_lm_loss_without_supervised_tokens_raises():
    labels = torch.full((2, 4), -100)
    labels[:, 0] = 1  # the first label is never a target either
    with pytest.raises(ValueError, match="no supervised tokens"):
        lm_loss(itg_logits(), labels)


# ----------------------------------------------------------------------------------------- combine


def test_combine_weights_enabled_terms_only():
    losses = {"itc": torch.tensor(2.0), "itm": torch.tensor(3.0), "itg": torch.tensor(100.0)}
    out = combine(losses, {"itc": 1.0, "itm": 0.5, "itg": 0.0})
    assert out["loss"].item() == pytest.approx(2.0 + 1.5)
    assert {k: v.item() for k, v in out.items() if k != "loss"} == {"itc": 2.0, "itm": 3.0, "itg": 100.0}
    assert combine({"itc": torch.tensor(2.0)}, {"itc": 1.0, "itm": 0.0})["loss"].item() == 2.0


def test_combine_errors():
    with pytest.raises(ValueError, match="itm"):
        combine({"itc": torch.tensor(1.0)}, {"itc": 1.0, "itm": 1.0})
    with pytest.raises(ValueError, match="positive weight"):
        combine({"itc": torch.tensor(1.0)}, {"itc": 0.0})
    with pytest.raises(ValueError, match="negative"):
        combine({"itc": torch.tensor(1.0)}, {"itc": -1.0})


def test_hard_negatives_skip_copies_of_the_positive_while_others_exist():
    # rows 0 and 1 share a caption and are each other's most similar column: never drawn for each other
    sims = torch.tensor([[5.0, 9.0, 0.0, 0.0], [9.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 1.0, 5.0]])
    same = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg = sample_hard_negatives(sims, sims, torch.arange(4), generator=g, same=same)
        assert not same[torch.arange(4), neg.text_idx].any() and not same[torch.arange(4), neg.image_idx].any()
    # a row whose every other column is a copy still gets a (non-positive) negative
    everything = torch.ones(4, 4, dtype=torch.bool)
    neg = sample_hard_negatives(sims, sims, torch.arange(4), generator=g, same=everything)
    assert (neg.text_idx != torch.arange(4)).all() and (neg.image_idx != torch.arange(4)).all()


def test_distill_loss_is_the_token_mean_kl_at_supervised_positions():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    labels = torch.full((2, 5), L.IGNORE_INDEX)
    labels[0, 2:4], labels[1, 4] = 1, 2  # positions 1, 2 of row 0 and 3 of row 1 predict them
    got = L.distill_loss_from_hidden(student, teacher, head, labels)
    rows = [(0, 1), (0, 2), (1, 3)]
    expected = sum(
        (F.softmax(head(teacher[b, t]), -1) * (F.log_softmax(head(teacher[b, t]), -1)
                                               - F.log_softmax(head(student[b, t]), -1))).sum()
        for b, t in rows) / len(rows)
    assert got.tokens.item() == 3 and torch.allclose(got.loss, expected, atol=1e-6)
    assert L.distill_loss_from_hidden(teacher, teacher, head, labels).loss.abs().item() < 1e-6
