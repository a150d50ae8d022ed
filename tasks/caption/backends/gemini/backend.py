"""`caption.backend: gemini`: captions from a Gemini model, through the store-wide caption cache.

Gemini captions cost money and time, so they go to the cache (`tasks/caption/backends/cache.py`)
as they arrive, keyed by model, prompt and word limit: any later run, of this or another preset,
sends only the images that cache does not hold yet. Failures are not cached: they are retried
on the next run, and the stage reports itself incomplete until there are none.
"""

from __future__ import annotations

import logging

from tasks.caption.backends.base import CaptionBackend, CaptionResult, CaptionRun
from tasks.caption.backends.cache import CACHE_DIR, CaptionCache
from tasks.caption.images import IngestImages
from tasks.config import GeminiConfig
from tasks.hashing import hash_value
from tasks.stage import StageContext

log = logging.getLogger("tok1d")


def gemini_cache_key(config: GeminiConfig) -> str:
    """What a cached Gemini caption depends on (not the key, endpoint, timeouts or retries)."""
    return "gemini-" + hash_value(
        {"backend": "gemini", "model": config.model, "prompt": config.prompt, "max_words": config.max_words}
    )[:24]


class GeminiCaptions(CaptionBackend):
    """Gemini captions of the images the cache lacks; the pool is the default (validation captions)."""

    def caption(self, ctx: StageContext, images: IngestImages) -> CaptionRun:
        config = self.config.gemini
        image_ids = images.image_ids
        key = gemini_cache_key(config)
        description = {"model": config.model, "prompt": config.prompt, "max_words": config.max_words}
        cache = CaptionCache(ctx.store.root / CACHE_DIR / key, self.config.shard_rows, description)
        cached = cache.load()
        missing = [image_id for image_id in image_ids if image_id not in cached]
        log.info("caption: %d of %d images already in the caption cache %s", len(image_ids) - len(missing), len(image_ids), key)
        run = CaptionRun()
        failures: dict[str, CaptionResult] = {}
        if missing:
            # Imported only now: a run whose captions are all cached needs neither the SDK nor a key.
            from tasks.caption.backends.gemini.client import GeminiCaptioner

            captioner = GeminiCaptioner(config)
            progress = ctx.progress(len(image_ids), "gemini captions", unit="img", initial=len(image_ids) - len(missing))
            try:
                for result in captioner.caption_many(images.pngs(missing)):
                    if result.ok:
                        cache.add(result)
                    else:
                        failures[result.image_id] = result
                    progress.update(1, failed=len(failures))
            finally:
                cache.flush()  # keep what arrived, also when the run stops on an error
                progress.close()
            stats = captioner.stats
            run = CaptionRun(requests=stats.requests, retries=stats.retries, truncated=stats.truncated)
            cached = cache.load()  # also picks up captions that a concurrent run added
        for image_id in image_ids:
            if image_id in cached:
                caption, origin = cached[image_id]
                run.results.append(CaptionResult(image_id, caption, origin))
            elif image_id in failures:
                run.results.append(failures[image_id])
        return run
