"""Evaluation: retrieval and zero-shot classification (retrieval.py); more land with stage 2."""
