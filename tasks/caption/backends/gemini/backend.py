"""`caption.backend: gemini`: captions from a Gemini model, through the store-wide caption cache.

Gemini captions cost money and time, so they go to the cache (`tasks/caption/backends/cache.py`)
as they arrive, keyed by model, prompt and word limit: any later run, of this or another preset,
sends only the images that cache does not hold yet. Failures are not cached: they are retried
on the next run, and the stage reports itself incomplete until there are none.

`mode: sync` sends one request per image (client.py); `mode: batch` sends them as batch jobs
(batch.py), recorded in the stage's work dir so that a rerun resumes them. Both store captions
in the same cache and record failures the same way.
"""

from __future__ import annotations

import logging
from typing import Callable

from tasks.caption.backends.base import CaptionBackend, CaptionResult, CaptionRun
from tasks.caption.backends.cache import CACHE_DIR, CaptionCache
from tasks.caption.backends.gemini.batch_ledger import BatchLedger
from tasks.caption.images import IngestImages
from tasks.config import GeminiConfig
from tasks.hashing import hash_value
from tasks.progress import Progress
from tasks.stage import StageContext

log = logging.getLogger("tok1d")

# Where a captioner hands each result: captions to the cache, failures to the run's record.
AddResult = Callable[[CaptionResult], None]


def gemini_cache_key(config: GeminiConfig) -> str:
    """What a cached Gemini caption depends on (not the key, endpoint, timeouts or retries)."""
    return "gemini-" + hash_value(
        {"backend": "gemini", "model": config.model, "prompt": config.prompt, "max_words": config.max_words}
    )[:24]


class GeminiCaptions(CaptionBackend):
    """Gemini captions of the images the cache lacks (`mode` sync or batch); the pool is the default."""

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
            progress = ctx.progress(len(image_ids), f"gemini {config.mode} captions", unit="img",
                                    initial=len(image_ids) - len(missing))

            def add(result: CaptionResult) -> None:
                if result.ok:
                    cache.add(result)
                else:
                    failures[result.image_id] = result

            try:
                if config.mode == "batch":
                    run = self._caption_batch(ctx, images, missing, add, cache, progress)
                else:
                    run = self._caption_sync(images, missing, add, progress)
            finally:
                cache.flush()  # keep what arrived, also when the run stops on an error
                progress.close()
            cached = cache.load()  # also picks up captions that a concurrent run added
        for image_id in image_ids:
            if image_id in cached:
                caption, origin = cached[image_id]
                run.results.append(CaptionResult(image_id, caption, origin))
            elif image_id in failures:
                run.results.append(failures[image_id])
        return run

    def _caption_sync(self, images: IngestImages, missing: list[str], add: AddResult, progress: Progress) -> CaptionRun:
        # Imported only now: a run whose captions are all cached needs neither the SDK nor a key.
        from tasks.caption.backends.gemini.client import GeminiCaptioner

        captioner = GeminiCaptioner(self.config.gemini)
        failed = 0
        for result in captioner.caption_many(images.pngs(missing)):
            add(result)
            failed += not result.ok
            progress.update(1, failed=failed)
        stats = captioner.stats
        return CaptionRun(requests=stats.requests, retries=stats.retries, truncated=stats.truncated)

    def _caption_batch(
        self, ctx: StageContext, images: IngestImages, missing: list[str], add: AddResult, cache: CaptionCache,
        progress: Progress,
    ) -> CaptionRun:
        from tasks.caption.backends.gemini.batch import GeminiBatchCaptioner

        captioner = GeminiBatchCaptioner(self.config.gemini, BatchLedger.open(ctx.work_dir))
        failed = 0

        def job_done(results: list[CaptionResult]) -> None:
            nonlocal failed
            for result in results:
                add(result)
            cache.flush()  # in the cache before the ledger marks the job done
            failed += sum(not result.ok for result in results)
            progress.update(len(results), failed=failed)

        captioner.run(missing, images, job_done)
        stats = captioner.stats
        details = {
            "batch_jobs_submitted": stats.jobs_submitted,
            "batch_jobs_resumed": stats.jobs_resumed,
            "batch_jobs_failed": stats.jobs_failed,
        }
        return CaptionRun(requests=stats.requests, retries=stats.retries, truncated=stats.truncated, details=details)
