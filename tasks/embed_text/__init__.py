"""The `embed-text` stage: text-encoder embeddings (per token, with mask, and pooled) of every caption.

TexTok feeds the per-token embeddings of each image's caption to its tokenizer and detokenizer.
See `tasks/embed_text/read.py` for consumers.
"""
