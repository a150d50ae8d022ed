"""Artifacts the tests start from, one module per stage face, built with the stages' own writers
(table schemas, shard writers, weight and metadata writers) and committed through the real store:

    store       commit a folder or a stage run's output with fixed test hashes
    ingest      an ingest artifact from images (arrays or PNGs), labels, splits and source captions
    caption     a caption artifact from per-image captions and per-class pools
    embed_text  an embed-text artifact from an EncodedBatch (random ones on request)
    tokenizer   a random-weights train-tokenizer artifact; the tiny config and a real training run
    tokens      a pretokenize artifact from token arrays
    fashion     real ingest -> caption -> embed-text outputs of a tiny Fashion-MNIST (the stages run)

Importable as `builders.<module>`: tests/conftest.py puts tests/ on sys.path. A test module
imports builders, helpers and fake servers, never another test module.
"""
