"""The ingest stage: images from a source -> square RGB PNGs with labels, captions and a split.

Later stages read its output through `tasks.ingest.read`.
"""
