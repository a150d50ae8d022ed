"""The Gemini caption backend: `backend.py` plugs it into the stage (cache, progress), `client.py`
talks to the service (google-genai, retries, API key). The SDK is imported only when a run has
images to send."""

from tasks.caption.backends.gemini.backend import GeminiCaptions, gemini_cache_key

__all__ = ["GeminiCaptions", "gemini_cache_key"]
