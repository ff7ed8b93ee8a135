"""Telemetry: Prometheus metrics (`auditor.telemetry.metrics` is the API callers use) and the
live drift export (`drift_export`)."""
