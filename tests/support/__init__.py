"""What several test rooms share: repository paths, data writers, tiny models and steps,
launch.py run helpers. Not tests; imported as `support.*` (tests/ is on pytest's pythonpath)."""
