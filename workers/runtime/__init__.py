"""The Celery runtime: the app and its settings, the message a job travels in, the task,
one delivery's step, the result store, and the kombu fix. See docs/architecture.md."""
