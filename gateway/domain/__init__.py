"""Pure logic, no I/O: validation, rate limits, rules, line protocol, the rules and device files."""
