"""Handing work to workers: the Celery app and dispatchers (auditor.queue.dispatch), and the
heartbeats that tell readiness a worker can serve (auditor.queue.heartbeat)."""
