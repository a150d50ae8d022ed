"""The pretokenize stage: the ingested images as 1D token sequences of the trained tokenizer."""
