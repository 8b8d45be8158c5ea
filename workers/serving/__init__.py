"""The serving side: the engine that decodes requests with a KV policy and ART, the OpenAI-compatible
protocol, the Ray Serve replica around them, and its metrics."""
