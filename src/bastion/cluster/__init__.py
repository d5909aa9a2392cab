"""Failover (issue 7): a lease decides which node is active; the others wait passive."""
