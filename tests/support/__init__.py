"""Helpers the tests share: private servers, HTTP serving, tokens, databases, Prometheus."""
