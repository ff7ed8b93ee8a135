"""Reading a loaded model: concept vectors and banks, per-request scores, replay of answers
served elsewhere, the null of ordinary answers and divergence verdicts, probe evaluation.
No database, no queue: serving (workers.serving) stores what this computes."""
