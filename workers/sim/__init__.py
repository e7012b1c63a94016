"""Stand-ins for the demo, the tests and bench/: the provider simulator, the tiny
generated MLX model, the simulated catalog, and `fleet demo`."""
