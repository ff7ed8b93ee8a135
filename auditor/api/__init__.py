"""The HTTP API: validates, writes, enqueues and reads. It never runs the model."""
