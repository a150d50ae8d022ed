"""The train-tokenizer stage: TiTok / TexTok 1D tokenizers on the ingested images."""
