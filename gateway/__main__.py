"""`python -m gateway` runs the `iotgw` command line."""

from gateway.cli.app import main

main()
