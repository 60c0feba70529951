"""The stage-1 step (ITC + ITM + ITG) on a tiny model: nothing in it reads a value back from the
device, and copies of a caption are found by comparing token rows."""

from __future__ import annotations

import pytest
import torch

from qvlm import losses as L
from qvlm.models.stage1 import same_rows
from qvlm.models.vlm import VLM
from qvlm.train.steps import step_losses

from sync_helpers import host_reads_in_qvlm


def stage1_batch(seed: int = 0) -> dict:
    """Six pairs with right padding in two rows, one caption twice (rows 0 and 3), and the collator's
    ITG positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (6, 9), generator=g)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, 6:], mask[4, 3:] = 0, 0
    ids[3] = ids[0]
    ids = ids.masked_fill(mask == 0, 0)
    return {"image_embeds": torch.randn(6, 17, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "itg_positions": L.itg_positions(mask)}


def loss_and_grads(model: VLM, batch: dict, cfg) -> tuple[dict, dict]:
    """One stage-1 loss and its backward (hard negatives drawn with seed 1): (detached terms, gradients)."""
    model.zero_grad(set_to_none=True)
    terms = step_losses(model, batch, cfg, generator=torch.Generator().manual_seed(1), dec_token_id=1)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def test_stage1_step_reads_nothing_back_from_the_device(tiny_cfg):
    """With the collator's ITG positions, the ITC + ITM + ITG losses and their backward make no
    host-device sync in qvlm's code (the hard negatives' draw, the caption copies, the ITM labels, the
    Q-Former's masks included), and give the losses and gradients of the path that finds the ITG
    positions on the device, which does sync (so the check can fail)."""
    tiny_cfg.model.qformer.dropout = 0.0
    assert all(tiny_cfg.train.losses.get(k, 0) > 0 for k in ("itc", "itm", "itg"))
    model = VLM.from_config(tiny_cfg).train()
    batch = stage1_batch()
    results = {}

    def run(b: dict, key: str) -> None:
        results[key] = loss_and_grads(model, b, tiny_cfg)

    assert host_reads_in_qvlm(lambda: run(batch, "index")) == []
    on_device = {k: v for k, v in batch.items() if k != "itg_positions"}
    assert len(host_reads_in_qvlm(lambda: run(on_device, "device"))) >= 2  # ITG's count and its positions
    (terms, grads), (terms_d, grads_d) = results["index"], results["device"]
    for key in ("itc", "itm", "itg", "loss"):
        torch.testing.assert_close(terms[key], terms_d[key], atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_d.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], grads_d[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("budget", [1, 1 << 26])  # one column per chunk, all columns at once
def test_same_rows_marks_the_rows_torch_unique_groups(budget):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2, (12, 3), generator=g)  # 8 possible rows: repeats are certain
    tokens[7], tokens[9] = tokens[2], tokens[2]
    groups = torch.unique(tokens, dim=0, return_inverse=True)[1]
    expected = groups[:, None] == groups[None, :]
    assert expected.sum() > 12 + 6  # repeats beyond the three copies of row 2
    assert torch.equal(same_rows(tokens, budget), expected)


def test_a_caption_copy_is_never_its_twins_hard_negative(tiny_cfg, monkeypatch):
    """The stage-1 step hands ITM's draw the copies of each caption (rows 0 and 3 here): however the
    similarities fall, row 0 never gets row 3's text or image as its negative."""
    from qvlm.models import stage1

    drawn = []
    real = L.sample_hard_negatives

    def spy(*args, **kwargs):
        neg = real(*args, **kwargs)
        drawn.append((kwargs["same"], neg))
        return neg

    monkeypatch.setattr(stage1.L, "sample_hard_negatives", spy)
    model = VLM.from_config(tiny_cfg).train()
    for seed in range(20):
        step_losses(model, stage1_batch(), tiny_cfg, generator=torch.Generator().manual_seed(seed), dec_token_id=1)
    for same, neg in drawn:
        assert same[0, 3] and same[3, 0] and same.sum() == 6 + 2
        assert neg.text_idx[0] != 3 and neg.image_idx[0] != 3 and neg.text_idx[3] != 0 and neg.image_idx[3] != 0


def reference_stage1_losses(model: VLM, batch: dict, negatives) -> dict:
    """BLIP-2's stage-1 losses written out plainly, for ``test_stage1_losses_match_a_plain_reference``:
    ITC as two cross-entropies over max-over-queries similarities, ITM as one bidirectional pass over
    the positives and the given hard negatives, ITG as one causal pass over queries and caption
    together (no query cache), with the LM head on every position."""
    qf, heads = model.qformer, model.heads
    images, ids, mask = batch["image_embeds"], batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0]
    img = torch.nn.functional.normalize(heads.vision_proj(qf(image_embeds=images).query), dim=-1)  # (B, Q, E)
    txt = torch.nn.functional.normalize(heads.text_proj(qf(input_ids=ids, attention_mask=mask).text[:, 0]), dim=-1)
    sim = torch.stack([torch.stack([(img[i] @ txt[j]).max() for j in range(b)]) for i in range(b)])  # (B, B)
    temp, target = heads.temp.clamp(L.TEMP_MIN, L.TEMP_MAX), torch.arange(b)
    itc = (torch.nn.functional.cross_entropy(sim / temp, target)
           + torch.nn.functional.cross_entropy(sim.T / temp, target)) / 2
    pair_images = torch.cat([images, images, images[negatives.image_idx]])
    pair_ids = torch.cat([ids, ids[negatives.text_idx], ids])
    pair_mask = torch.cat([mask, mask[negatives.text_idx], mask])
    query = qf(image_embeds=pair_images, input_ids=pair_ids, attention_mask=pair_mask, mode="bidirectional").query
    labels = torch.tensor([1] * b + [0] * (2 * b))
    itm = torch.nn.functional.cross_entropy(heads.itm_head(query).mean(dim=1), labels)
    dec = ids.clone()
    dec[:, 0] = 1  # the decoder-start token id the step is given
    text = qf(image_embeds=images, input_ids=dec, attention_mask=mask, mode="causal").text  # (B, T, Dq)
    targets = dec[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    itg = torch.nn.functional.cross_entropy(heads.lm_head(text[:, :-1]).flatten(0, 1), targets.flatten())
    return {"itc": itc, "itm": itm, "itg": itg, "loss": itc + itm + itg}


def test_stage1_losses_match_a_plain_reference(tiny_cfg, monkeypatch):
    """The step's ITC, ITM and ITG (LAVIS's passes, the query cache for ITG, the LM head on caption
    positions only) equal a plain reference's losses and gradients, given the same hard negatives."""
    from qvlm.models import stage1

    tiny_cfg.model.qformer.dropout = 0.0
    model = VLM.from_config(tiny_cfg).train()
    batch = stage1_batch()
    drawn = []
    real = L.sample_hard_negatives
    monkeypatch.setattr(stage1.L, "sample_hard_negatives", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    terms, grads = loss_and_grads(model, batch, tiny_cfg)
    model.zero_grad(set_to_none=True)
    ref = reference_stage1_losses(model, batch, drawn[0])
    ref["loss"].backward()
    for key in ("itc", "itm", "itg", "loss"):
        torch.testing.assert_close(terms[key], ref[key].detach(), atol=1e-5, rtol=1e-5)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ref_grads.keys() == grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4)
