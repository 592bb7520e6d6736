"""Thin ``ray job submit`` entrypoints and the submitter over the library functions."""
