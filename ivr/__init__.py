"""Call flows (say, gather, menu, record, bridge, escalate)."""
