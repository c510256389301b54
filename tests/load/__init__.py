"""Load and fault tests against real server processes (loopback only, bounded in count and time)."""
