"""The typed run config (one source per default), Hydra composition, Flower's flat form."""
