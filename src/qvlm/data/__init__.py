"""Data for qvlm (docs/data.md): one record format, many sources, robust decoding, collation.

Modules: ``records`` (the record dict, skip markers, ``iter_records``), ``sources``
(``open_dataset(spec, split)``: synth, JSONL/CSV, HF datasets, WebDataset shards), ``synth`` and
``scenes_metrics`` (synthetic scenes, caption parsing and scoring), ``decode`` (image/caption
cleaning, ``SkipRecord``, ``SkipCounter``), ``webdataset`` and ``hf`` (the two larger source kinds),
``collate`` (``Stage1Collator``, ``LengthGroupedSampler``), ``fixtures`` (bad-input files for tests),
``inspect`` and ``commands`` (``qvlm data synth`` / ``qvlm data inspect``). The frozen-feature cache is
``qvlm.data.cache``. Nothing is imported here: no work at import time.
"""
