"""The client side's learning: data, files, model, pooling, tasks, the local loop, the client round."""
