"""The whole local stack as supervised processes: ``python -m services.stack up|down|status``."""
