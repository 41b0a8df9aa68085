"""The `iotgw` command line: one module per command group, put together in app.py."""
