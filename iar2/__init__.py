"""iar2-repro: a reproduction of IAR2 (semantic-detail associated token prediction)."""

__version__ = "0.1.0"
