"""Carrier trunks, rotation, health probing and failover."""
