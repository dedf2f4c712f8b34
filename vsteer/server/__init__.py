"""OpenAI-compatible serving with per-request steering (vLLM's server + vsteer's engine)."""
