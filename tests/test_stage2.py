"""Stage 2 end to end on tiny models: train, save/load logits, caption/chat, export with merged LoRA."""

import json

import pytest
import torch
from PIL import Image

from qvlm.cli import main
from qvlm.config import load_config
from qvlm.models.generate import GenerationConfig
from qvlm.models.vlm import VLM
from qvlm.train.loop import train

from conftest import CONFIGS
from sync_helpers import host_reads_in_qvlm


@pytest.fixture(scope="module")
def stage2_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    cfg1 = load_config(CONFIGS / "tiny.yaml", ["train.max_steps=2", "eval.max_samples=0"])
    train(cfg1, root / "s1", progress=False)
    cfg2 = load_config(CONFIGS / "tiny.yaml", ["train.stage=2", "train.max_steps=2", "eval.max_samples=0",
                                               f"train.init_from={root / 's1' / 'model'}"])
    train(cfg2, root / "s2", progress=False)
    model = VLM.from_pretrained(root / "s2" / "model")
    with torch.no_grad():  # make the adapters matter, then save again
        for _, p in model.llm.lora_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(root / "model")
    return root


def batch_for(model: VLM):
    from qvlm.inference import prompt_batch

    ids, mask, image_mask = prompt_batch(model, ["Describe the image."] * 2, None)
    return ids, mask, image_mask, torch.randn(2, 17, 32)


def test_stage2_writes_lora_projector_and_metrics(stage2_model):
    files = {p.name for p in (stage2_model / "s2" / "model").iterdir()}
    assert {"config.yaml", "qformer.safetensors", "projector.safetensors", "lora.safetensors"} <= files
    rows = [json.loads(x) for x in (stage2_model / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert all("lm" in r for r in rows if "loss" in r)


def test_save_load_reproduces_logits(stage2_model):
    a = VLM.from_pretrained(stage2_model / "model").eval()
    b = VLM.from_pretrained(stage2_model / "model").eval()
    ids, mask, image_mask, feats = batch_for(a)
    with torch.no_grad():
        la = a(ids, mask, image_mask, image_embeds=feats).logits
        lb = b(ids, mask, image_mask, image_embeds=feats).logits
    assert torch.equal(la, lb)


def test_merged_export_matches_adapter_model(stage2_model, tmp_path):
    assert main(["export", "--model", str(stage2_model / "model"), "--out", str(tmp_path / "merged"),
                 "--merge-lora"]) == 0
    assert not (tmp_path / "merged" / "lora.safetensors").exists()
    adapter = VLM.from_pretrained(stage2_model / "model").eval()
    merged = VLM.from_pretrained(tmp_path / "merged").eval()
    assert not merged.llm.has_lora
    from qvlm.inference import describe_embeds

    feats = torch.randn(2, 17, 32)
    gen = GenerationConfig(max_new_tokens=8)
    a = describe_embeds(adapter, feats, gen=gen).token_ids
    b = describe_embeds(merged, feats, gen=gen).token_ids
    assert a == b
    with adapter.llm.adapters_disabled():  # and the adapters really change the output
        base = describe_embeds(adapter, feats, gen=GenerationConfig(max_new_tokens=8)).token_ids
    ids, mask, image_mask, _ = batch_for(adapter)
    with torch.no_grad():
        la = adapter(ids, mask, image_mask, image_embeds=feats).logits
        lm = merged(ids, mask, image_mask, image_embeds=feats).logits
        with adapter.llm.adapters_disabled():
            lbase = adapter(ids, mask, image_mask, image_embeds=feats).logits
    assert torch.allclose(la, lm, atol=1e-4)
    assert not torch.allclose(la, lbase, atol=1e-3)
    del base


def test_caption_and_chat_cli(stage2_model, tmp_path, capsys):
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (40, 30), color).save(tmp_path / f"{i}.png")
    assert main(["caption", "--model", str(stage2_model / "model"), str(tmp_path / "0.png"),
                 str(tmp_path / "1.png"), "--json", "--max-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["image"] for c in out["captions"]] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    assert main(["chat", "--model", str(stage2_model / "model"), str(tmp_path / "0.png"),
                 "--prompt", "What colour is it?", "--max-tokens", "4"]) == 0
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["caption", "--model", str(stage2_model / "model"), str(tmp_path / "bad.png")]) == 1
    err = capsys.readouterr().err
    assert "bad.png: the data is not an image PIL can read" in err and "SkipRecord" not in err
    assert main(["eval", "retention", "--model", str(stage2_model / "s1" / "model")]) == 2  # a stage-1 model
    assert "needs a stage-2 model" in capsys.readouterr().err


def test_eval_caption_cli(stage2_model, capsys, monkeypatch):
    """Also with --compile (compiled decoding steps): the same captions, so the same metrics."""
    from qvlm.models.llm import LanguageModel

    compiled = []
    original = LanguageModel.compiled_model
    monkeypatch.setattr(LanguageModel, "compiled_model", lambda self, *a: compiled.append(1) or original(self, *a))
    runs, used = [], []
    for flags in ([], ["--compile"]):
        assert main(["eval", "caption", "--model", str(stage2_model / "model"), "--max-samples", "4", "--json",
                     *flags]) == 0
        runs.append(json.loads(capsys.readouterr().out))
        used.append(bool(compiled))
    assert used == [False, True]
    metrics = runs[0]
    for key in ("bleu4", "rouge_l", "cider", "color_shape_acc", "count_acc", "exact_match"):
        assert key in metrics
    assert metrics["n"] == 4
    assert runs[1] == metrics


def test_stage2_loss_equals_full_logits_loss(stage2_model):
    from qvlm import losses as L
    from qvlm.config import load_config
    from qvlm.train.steps import stage2_losses

    model = VLM.from_pretrained(stage2_model / "model").eval()
    ids, mask, image_mask, feats = batch_for(model)
    labels = ids.clone()
    labels[:, :-3] = L.IGNORE_INDEX  # supervise the last 3 tokens of each prompt
    batch = {"input_ids": ids, "attention_mask": mask, "image_mask": image_mask, "image_embeds": feats,
             "labels": labels}
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.stage=2"])
    with torch.no_grad():
        fast = stage2_losses(model, batch, cfg)["loss"]
        full = L.lm_loss(model(ids, mask, image_mask, image_embeds=feats).logits, labels).loss
    assert torch.allclose(fast, full, atol=1e-5)


@pytest.mark.parametrize("prob,kinds", [(1.0, {"caption"}), (0.0, {"qa"})])
def test_data_caption_prob_reaches_the_stage2_stream(stage2_model, prob, kinds):
    """``data.caption_prob`` decides caption vs question-answer samples for synthetic scenes (each
    has both): 1 trains on captions only, 0 on answers only."""
    from qvlm.train.batches import build_stream

    model = VLM.from_pretrained(stage2_model / "model")
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.stage=2", f"data.caption_prob={prob}"])
    batch = build_stream(cfg, model, progress=False).next_batch(torch.device("cpu"))
    got = {"caption" if t == c else "qa" for t, c in zip(batch["targets"], batch["captions"])}
    assert got == kinds and len(batch["targets"]) == cfg.train.batch_size


@pytest.mark.parametrize("positions", ["image", "from_image"])
def test_position_limited_lora_trains_saves_and_refuses_merge(stage2_model, tmp_path, capsys, positions):
    """model.llm.lora.positions=image / from_image: trained adapters act from the image slots on only;
    saved and loaded alike; text-only input is the base model's; a merged export is refused."""
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.stage=2", "train.max_steps=2", "eval.max_samples=0",
                                              f"model.llm.lora.positions={positions}", "model.llm.lora.dropout=0.0",
                                              f"train.init_from={stage2_model / 's1' / 'model'}"])
    train(cfg, tmp_path / "run", progress=False)
    model = VLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert model.llm.lora_scope == positions and model.llm.lora_limited
    assert any(p.abs().sum() > 0 for n, p in model.llm.lora_parameters() if "lora_B" in n)  # trained
    with torch.no_grad():  # make the adapters matter
        for _, p in model.llm.lora_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "saved")
    loaded = VLM.from_pretrained(tmp_path / "saved").eval()
    ids, mask, image_mask, feats = batch_for(model)
    text = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        logits = model(ids, mask, image_mask, image_embeds=feats).logits
        assert torch.allclose(loaded(ids, mask, image_mask, image_embeds=feats).logits, logits, atol=1e-5)
        plain = model.llm(model.llm.embed(text)).logits
        with model.llm.adapters_disabled():
            base_logits = model(ids, mask, image_mask, image_embeds=feats).logits
            assert torch.equal(model.llm(model.llm.embed(text)).logits, plain)  # text only: the base model
    assert not torch.allclose(logits, base_logits, atol=1e-3)
    assert main(["export", "--model", str(tmp_path / "saved"), "--out", str(tmp_path / "merged"), "--merge-lora"]) != 0
    assert "cannot be folded" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "saved"), "--out", str(tmp_path / "copy")]) == 0


@pytest.mark.parametrize("positions", ["all", "from_image"])
def test_compiled_layers_match_eager(positions):
    """train.compile compiles each Q-Former and LLM layer (whole graphs: a break would raise here);
    the stage-2 loss and the gradients match the eager model's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qvlm import losses as L
    from qvlm.train.speed import compile_layers
    from qvlm.train.steps import stage2_losses

    cfg = load_config(CONFIGS / "tiny.yaml", ["train.stage=2", f"model.llm.lora.positions={positions}"])
    model = VLM.from_config(cfg, with_llm=True).eval()  # eval: no dropout, so both runs are comparable
    ids, mask, image_mask, feats = batch_for(model)
    labels = ids.clone()
    labels[:, :-3] = L.IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": mask, "image_mask": image_mask, "image_embeds": feats,
             "labels": labels}

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = stage2_losses(model, batch, cfg)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads()
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    n = compile_layers(model, backend="aot_eager", fullgraph=True)
    assert n == len(model.qformer.layers) + len(model.llm.decoder_layers())
    loss, grads = loss_and_grads()
    assert counters["stats"]["unique_graphs"] > graphs  # the layers ran compiled
    assert torch.allclose(loss, eager_loss, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and any("lora_" in n for n in grads)
    assert all(torch.allclose(grads[n], eager_grads[n], atol=1e-6) for n in grads)
    torch._dynamo.reset()


def _acting_model_and_batch(positions: str, n: int, caption_prob: float) -> tuple:
    """(cfg, model, batch): a tiny stage-2 model in eval mode (no dropout, so runs are comparable)
    whose projector and adapters act (LoRA B starts at zero), and a collated batch of ``n``
    synthetic scenes with their image features in place of the pixels."""
    from qvlm.data.collate_stage2 import Stage2Collator
    from qvlm.data.synth import SynthScenes

    cfg = load_config(CONFIGS / "tiny.yaml", ["train.stage=2", f"model.llm.lora.positions={positions}"])
    model = VLM.from_config(cfg, with_llm=True).eval()
    torch.manual_seed(0)
    for p in list(model.projector.parameters()) + [p for _, p in model.llm.lora_parameters()]:
        p.data.normal_(0, 0.5)
    scenes = SynthScenes(n, image_size=32)
    collate = Stage2Collator(model.vision.processor, model.llm.tokenizer, cfg.model.qformer.num_queries,
                             cfg.model.llm, max_len=64, caption_prob=caption_prob)
    batch = collate([scenes[i] for i in range(n)])
    with torch.no_grad():
        batch["image_embeds"] = model.vision(batch.pop("pixel_values"))
    return cfg, model, batch


def _loss_and_grads(model, batch: dict, cfg) -> tuple:
    """The stage-2 loss and every parameter's gradient after its backward."""
    from qvlm.train.steps import stage2_losses

    model.zero_grad(set_to_none=True)
    loss = stage2_losses(model, batch, cfg)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(run: tuple, other: tuple, atol: float, rtol: float) -> None:
    """Two ``_loss_and_grads`` results agree: the loss, and every gradient, LoRA's among them."""
    (loss, grads), (other_loss, other_grads) = run, other
    assert torch.allclose(loss, other_loss, atol=atol)
    assert grads.keys() == other_grads.keys() and any("lora_" in n for n in grads)
    for n in grads:
        assert torch.allclose(grads[n], other_grads[n], atol=atol, rtol=rtol), n


@pytest.mark.parametrize("positions", ["all", "from_image"])
def test_right_padded_rows_train_without_the_padding_mask(positions):
    """The collator right-pads, so the LLM runs plain causal attention (no padding mask): the loss
    and every gradient are those of the masked forward; a left-padded batch would differ, and a batch not marked right-padded keeps its mask."""
    from qvlm.train.steps import padding_mask

    cfg, model, batch = _acting_model_and_batch(positions, 6, caption_prob=0.5)
    assert batch["padding_side"] == "right" and padding_mask(batch) is None
    assert not bool(batch["attention_mask"].all())  # some rows are padded
    masked = {k: v for k, v in batch.items() if k != "padding_side"}
    assert padding_mask(masked) is batch["attention_mask"]
    causal = _loss_and_grads(model, batch, cfg)
    _assert_same(causal, _loss_and_grads(model, masked, cfg), atol=1e-6, rtol=1e-5)
    # the same rows padded on the left: without the mask the real tokens would see the pads
    shift = (1 - batch["attention_mask"]).sum(1)
    left = {k: v for k, v in batch.items() if k not in ("image_positions", "label_positions")}
    for key in ("input_ids", "attention_mask", "labels", "image_mask"):
        left[key] = torch.stack([row.roll(int(s)) for row, s in zip(batch[key], shift)])
    left_loss, _ = _loss_and_grads(model, left, cfg)
    assert not torch.allclose(left_loss, causal[0], atol=1e-4)


@pytest.mark.parametrize("positions", ["all", "from_image"])
def test_stage2_step_reads_nothing_back_from_the_device(positions):
    """With the collator's image and label positions (found on the CPU), the stage-2 loss and its
    backward make no host-device sync in qvlm's code, and give the loss and gradients of the
    path that finds them on the device, which does sync (so the check can fail)."""
    cfg, model, batch = _acting_model_and_batch(positions, 5, caption_prob=0.5)
    assert batch["label_positions"].shape[1] == int((batch["labels"][:, 1:] != -100).sum())
    results = {}

    def run(b: dict, key: str):
        results[key] = _loss_and_grads(model, b, cfg)

    assert host_reads_in_qvlm(lambda: run(batch, "index")) == []
    on_device = {k: v for k, v in batch.items() if k not in ("image_positions", "label_positions")}
    assert len(host_reads_in_qvlm(lambda: run(on_device, "device"))) >= 3  # the check, the count, the gather
    _assert_same(results["index"], results["device"], atol=1e-6, rtol=1e-5)
    embeds, tokens = model.llm.embed(batch["input_ids"]), torch.zeros(5, cfg.model.qformer.num_queries, 32)
    with pytest.raises(ValueError, match="image_positions"):  # positions of another batch
        VLM.merge(embeds, tokens, batch["image_mask"], batch["image_positions"][:, :-1])
