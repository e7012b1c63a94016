"""The chaos suite: real fleets (their own redis-server, simulator, worker processes,
ledger) put through worker kills, Redis restarts, provider faults, poison jobs, duplicate
submissions, bad input and secrets hunts, then audited job by job.

    .venv/bin/pytest -q tests/chaos          # the scenarios as tests
    .venv/bin/python -m tests.chaos.report   # the same scenarios, as a table
"""
