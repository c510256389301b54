"""End-to-end tests of the command line, run as real processes."""
