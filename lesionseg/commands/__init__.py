"""The command-line layer: each job's arguments, help text and the function `lesionseg.cli`
runs for it; the library modules below know nothing of argparse."""
