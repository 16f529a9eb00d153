"""Evaluations: perplexity (ppl.py); more arrive as modules beside it."""
