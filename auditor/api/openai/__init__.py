"""OpenAI-compatible, monitored: /v1/chat/completions and /v1/completions. `protocol` is the wire
format, `router` the routes, `serving` what they do. Every request's full scores are rows in the
database; the response carries the OpenAI shape plus the `auditor` block."""
