"""Cluster mode (`[store] backend = "redis"`): replicas of the standalone server sharing a real Redis."""
