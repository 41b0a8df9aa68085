"""`python -m gateway` runs the `iotgw` command line."""

from gateway.cli import main

main()
