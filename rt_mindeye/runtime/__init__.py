"""Wiring of the stages into the three services (scanner host, decoder, console) and the session workflow.

This is the only package that imports several stages; the stages themselves never import each other.
"""
