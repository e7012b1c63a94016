"""The fleet's Celery app where Celery's own commands look for it:

    celery -A workers worker -Q free
    celery -A workers beat
    celery -A workers flower

For `-A workers` Celery imports the package, finds no `app` or `celery` attribute on it
(workers/__init__.py imports nothing, so that importing `workers` loads no Celery) and
then imports this submodule, `workers.celery`. The name shadows nothing: every module of
the package imports absolutely, so `import celery` there is always the library.
"""

from __future__ import annotations

from celery import Celery

from workers.runtime.celery_app import get_app

# Built from the FLEET_* environment of the process that imports it (a worker, beat, Flower).
app: Celery = get_app()
