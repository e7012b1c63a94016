"""The Celery beat schedule: heartbeat and cron jobs (filled in with the fleet issue)."""
