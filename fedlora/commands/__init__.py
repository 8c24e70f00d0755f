"""What the CLI calls: simulate, centralised, sweep, report, predict, multirun, deploy."""
