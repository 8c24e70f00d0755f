"""Tools for developers, outside the package the Flower App ships."""
