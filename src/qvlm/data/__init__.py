"""Data for qvlm (DESIGN.md §3): synthetic scenes, file / HF / WebDataset sources, robust decoding,
collation, the bad-input fixture generator and ``data inspect``.

Nothing is imported here (no work at import time); import the modules you need:
``qvlm.data.sources.open_dataset``, ``qvlm.data.collate.Stage1Collator``, ``qvlm.data.synth``...
"""
