"""Fleet-wide live state on the state Redis: connections and keys, limits and health,
the dispatcher's cached view, delivery counts, dead letters, idempotency keys."""
