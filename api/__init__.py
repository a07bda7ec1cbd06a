"""Command line entry points, settings and (later) the HTTP API."""
