"""Deployment: certificates, node keys and the Flower command lines."""
