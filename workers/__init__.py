"""modelfleet's I/O side: the Celery app, its tasks, provider adapters, limits, ledger.

Kept empty of imports so that `fleet route` and friends start without loading Celery.
"""
