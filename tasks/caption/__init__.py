"""The `caption` stage: one caption per ingested image (from the data, class names or Gemini).

TexTok conditions its tokenizer on caption text embeddings; this stage produces the captions
(`captions`), the images it could not caption (`failures`) and per-class caption pools
(`caption_pool`) for class-conditional generation. See `tasks/caption/read.py` for consumers.
"""
