"""Pure logic, no services."""
