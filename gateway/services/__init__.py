"""The running services: bridge, writer, rules engine, the registry view, and their runtime."""
