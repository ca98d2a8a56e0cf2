"""Locust load tests of mnist-serve: `python -m loadtest.run`, `python -m loadtest.batching_study`,
and `locust -f loadtest/locustfile.py`."""
