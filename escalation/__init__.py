"""Escalation chains, channels, retries, fallback, acknowledgements and audit."""
