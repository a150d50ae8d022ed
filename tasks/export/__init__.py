"""Trained artifacts outside the pipeline: finding them by id or folder, what a tokenizer needs to
run on new images (`spec`), and `tok1d export`'s Hugging Face-style folder (`folder`, `card`,
`hub`, `push`). A CLI command's code, not a pipeline stage: nothing here is in the registry."""
