"""VQ tokenizers: LlamaGen-compatible encoder/decoder with single, semantic-detail associated
and unassociated dual quantisers, their training, evaluation and checkpoint import."""
