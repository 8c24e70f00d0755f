"""A run's outputs: the run folder's names, metrics, checkpoints, trackers, the export, the console."""
