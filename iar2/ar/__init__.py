"""Autoregressive models: the LlamaGen-compatible GPT backbone and the IAR / IAR2 prediction heads."""
