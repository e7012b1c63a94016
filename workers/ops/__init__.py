"""Running the fleet's processes: `fleet up`, the supervisor, the private redis-server,
each queue's pool, and `fleet status`."""
