"""Hostile input: property-based arguments, malformed protocol traffic, broken config files."""
