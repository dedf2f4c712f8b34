"""vsteer: per-request activation steering inside vLLM."""
