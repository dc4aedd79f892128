"""The job domain, shared by the API and the worker and importing neither.

- `status`: the statuses a job can be in.
- `transitions`: the one table of legal moves, each move one compare-and-set with its event.
- `events`, `checkpoints`: what a job reports and keeps.
- `spec`: the resolved training spec (the API checks a request with it; the worker trains with it).
- `storage_keys`: where a job's files, checkpoints and adapters live in storage.
- `broker`: the Celery configuration and the send of a job to the workers, by task name.
- `reconcile`: re-driving what the broker lost, run by the API at start-up and by every worker.
"""
