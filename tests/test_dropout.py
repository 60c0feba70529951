"""qvlm.models.dropout: the Q-Former's cheap CPU dropout masks keep F.dropout's distribution and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvlm.models.dropout import Dropout, drop_probability, dropout
from qvlm.models.qformer import QFormer

N = 1 << 20


def test_drop_probability_is_p_on_a_1_over_65536_grid():
    assert drop_probability(0.1) == 6554 / 65536 and abs(drop_probability(0.1) - 0.1) < 1 / 131072
    assert drop_probability(0.5) == 0.5 and drop_probability(0.0) == 0.0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_drop_at_the_rate_asked_independently_and_keep_the_mean(p):
    torch.manual_seed(0)
    y = dropout(torch.ones(N), p, training=True)
    q = drop_probability(p)
    dropped = y == 0
    sigma = (q * (1 - q) / N) ** 0.5
    assert abs(dropped.float().mean().item() - q) < 6 * sigma
    assert torch.all(y[~dropped] == torch.tensor(1 / (1 - q), dtype=y.dtype))
    assert abs(y.mean().item() - 1) < 6 * sigma / (1 - q)  # unbiased
    # the four 16-bit slices of one random word are independent draws: neighbours both dropped ~ q^2
    both = (dropped[:-1] & dropped[1:]).float().mean().item()
    assert abs(both - q * q) < 6 * (q * q / N) ** 0.5 + 1e-4
    for lane in range(4):  # each slice of the word on its own drops at the rate too
        rate = dropped[lane::4].float().mean().item()
        assert abs(rate - q) < 6 * 2 * sigma


def test_gradient_is_the_same_mask_and_dtype_is_kept():
    torch.manual_seed(1)
    x = torch.randn(4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    y = dropout(x, 0.25, training=True)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    kept = y.detach() != 0
    assert torch.equal(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.75)) and not x.grad[~kept].any()


def test_seeded_runs_repeat_and_off_paths_are_pytorchs():
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    a = dropout(x, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.1, True))
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, True) is x
    assert not dropout(x, 1.0, True).any()
    torch.manual_seed(3)
    reference = F.dropout(x, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1, True, cheap_masks=False), reference)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)


def test_qformer_hidden_dropouts_use_it_and_can_switch_back():
    from transformers import BertConfig

    qf = QFormer(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                 vision_width=16, num_queries=4, dropout=0.1)
    drops = [m for m in qf.modules() if isinstance(m, Dropout)]
    assert len(drops) == 1 + 4 + 3  # embeddings; layer 0: self-attn, cross-attn, 2 FFNs; layer 1: no cross-attn
    image = torch.randn(2, 5, 16)
    qf.eval()
    ref = qf(image_embeds=image).query
    qf.train()
    torch.manual_seed(0)
    cheap = qf(image_embeds=image).query
    for m in drops:
        m.cheap_masks = False
    torch.manual_seed(0)
    torch_masks = qf(image_embeds=image).query
    assert not torch.equal(cheap, ref) and not torch.equal(torch_masks, cheap)  # dropout on; other masks
