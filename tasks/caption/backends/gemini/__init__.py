"""The Gemini caption backend: `backend.py` plugs it into the stage (cache, progress), `client.py`
talks to the service one request per image (google-genai, retries, rate limit, API key), `batch.py`
through batch jobs (`mode: batch`) that `batch_ledger.py` records for a rerun to resume. The SDK
is imported only when a run has images to send."""

from tasks.caption.backends.gemini.backend import GeminiCaptions, gemini_cache_key

__all__ = ["GeminiCaptions", "gemini_cache_key"]
