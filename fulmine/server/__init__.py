"""The OpenAI-compatible HTTP server: protocol, the engine thread, routes, metrics."""
