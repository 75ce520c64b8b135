"""Load tests: Locust users for every backend (``locust -f loadtests``) and ``make bench``.

``locustfile.py`` holds the Locust users and the stepped load shape; ``targets.py`` what they
send and how every answer is checked; ``bench.py`` runs the headless comparison of the three
backends through the gateway and ``report.py`` turns its CSVs and metrics into a report.

``locust -f loadtests`` imports every ``.py`` file of this folder whose name does not start
with ``_``; only ``locustfile.py`` defines users, and the other modules do nothing on import.
"""
